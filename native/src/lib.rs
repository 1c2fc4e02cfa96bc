//! Meterline's compiled envelope decoder and column builder (issue 14).
//!
//! The columnar rollup fold (`meterline/aggregators/columnar/`) spent most of its time
//! building Python objects per event: orjson makes a str per customer and meter, a dict
//! per event's dimensions, and the column builder then walks them to factorise, validate
//! and group. Here both steps run over the envelope bytes without a Python object per
//! event:
//!
//! - `Decoder.decode(payload)` parses one envelope into interned per-batch columns. It
//!   accepts a strict *subset* of what `meterline.core.envelope.decode_batch` accepts,
//!   with the same values: anything it is not sure of (a structural error, a duplicate
//!   key, a quantity that is not an int64, a top level that is not an object, ...) returns
//!   `None`, and the caller hands that record to the per-event reference fold, which gives
//!   the exact Python verdict. So no refusal reason, and no rule of its own, lives here.
//! - `Rules.build(batches, now_ms)` turns a run of decoded batches into the arrays of
//!   `columns.Columns`: customer / meter / group codes in first-seen order, and the
//!   validation verdict of every event with `MeterPlan.check`'s precedence.
//!
//! Limits, reason codes and meter rules all come from Python (one source); the
//! equivalence tests (tests/aggregators/columnar) run the fold with and without this
//! module against the per-event fold.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyList, PyString, PyTuple};
use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};

mod windows;

// ------------------------------------------------------------------ parsing

/// A JSON string, borrowed from the payload when it holds no escapes.
struct Str<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Str<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Str<'a>, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Str<'a>, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Str<'a>, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

/// An event's dimensions, in document order. A repeated key is refused (orjson keeps
/// the last one; the Python path decides such an envelope).
struct Dims<'a>(Vec<(Str<'a>, Str<'a>)>);

// Far above any real limit (MAX_DIMENSIONS is 16): only bounds the duplicate scan.
const DIMS_SCAN_LIMIT: usize = 256;

impl<'de: 'a, 'a> Deserialize<'de> for Dims<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Dims<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Dims<'a>, A::Error> {
                let mut pairs: Vec<(Str<'a>, Str<'a>)> = Vec::new();
                while let Some((k, v)) = map.next_entry::<Str<'a>, Str<'a>>()? {
                    if pairs.len() >= DIMS_SCAN_LIMIT || pairs.iter().any(|(p, _)| p.0 == k.0) {
                        return Err(de::Error::custom("duplicate or too many keys"));
                    }
                    pairs.push((k, v));
                }
                Ok(Dims(pairs))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// Absent -> None (with `default`), present -> Some(value), so `"id": null` (refused by
/// the Python reader) is told apart from no "id" at all.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

#[derive(serde::Deserialize)]
struct Envelope<'a> {
    v: i64,
    #[serde(borrow)]
    batch_id: Str<'a>,
    created_ms: i64,
    count: i64,
    #[serde(borrow)]
    customer: Vec<Str<'a>>,
    #[serde(borrow)]
    meter: Vec<Str<'a>>,
    quantity: Vec<i64>,
    timestamp_ms: Vec<i64>,
    #[serde(default, borrow, deserialize_with = "present")]
    id: Option<Option<Vec<Option<Str<'a>>>>>,
    #[serde(default, borrow, deserialize_with = "present")]
    dimensions: Option<Option<Vec<Option<Dims<'a>>>>>,
    #[serde(default, borrow, deserialize_with = "present")]
    event_source: Option<Option<Vec<Option<Str<'a>>>>>,
    #[serde(default, borrow)]
    source: Option<Str<'a>>,
    #[serde(default, borrow)]
    producer: Option<Str<'a>>,
    #[serde(default)]
    seq: Option<i64>,
}

/// Python's len(): code points, not bytes (a byte count bounds it from above).
fn chars_within(s: &str, lo: usize, hi: usize) -> bool {
    if s.len() <= hi {
        return s.len() >= lo;
    }
    let n = s.chars().count();
    lo <= n && n <= hi
}

/// One envelope's events: strings interned per batch, codes into `strings`.
#[pyclass(frozen, module = "meterline_native")]
struct NativeBatch {
    #[pyo3(get)]
    batch_id: String,
    #[pyo3(get)]
    created_ms: i64,
    #[pyo3(get)]
    producer: Option<String>,
    #[pyo3(get)]
    seq: Option<i64>,
    #[pyo3(get)]
    source: Option<String>,
    #[pyo3(get)]
    max_timestamp: i64,
    abs_sum: u128,
    strings: Vec<String>,
    customer: Vec<u32>,
    meter: Vec<u32>,
    quantity: Vec<i64>,
    timestamp: Vec<i64>,
    ids: Option<Vec<Option<String>>>,
    // Event i's dimensions are dim_pairs[dim_start[i]..dim_start[i + 1]] (key, value)
    // codes; None: no event has any.
    dim_start: Option<Vec<u32>>,
    dim_pairs: Vec<(u32, u32)>,
}

#[pymethods]
impl NativeBatch {
    fn __len__(&self) -> usize {
        self.quantity.len()
    }

    /// The exact sum of |quantity| (a Python int: it can pass 64 bits).
    #[getter]
    fn abs_sum(&self) -> u128 {
        self.abs_sum
    }
}

struct Limits {
    max_bytes: usize,
    max_events: i64,
    id: usize,
    customer: usize,
    meter: usize,
    source: usize,
    dims: usize,
    key: usize,
    value: usize,
}

struct Interner<'a> {
    codes: HashMap<&'a str, u32>,
    strings: Vec<&'a str>,
}

impl<'a> Interner<'a> {
    fn new() -> Self {
        Interner { codes: HashMap::new(), strings: Vec::new() }
    }
    fn code(&mut self, s: &'a str) -> u32 {
        if let Some(&c) = self.codes.get(s) {
            return c;
        }
        let c = self.strings.len() as u32;
        self.codes.insert(s, c);
        self.strings.push(s);
        c
    }
}

fn decode_envelope(l: &Limits, payload: &[u8]) -> Option<NativeBatch> {
    if payload.len() > l.max_bytes {
        return None;
    }
    // serde would read a struct from a JSON array too; the format wants an object.
    let first = payload.iter().find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))?;
    if *first != b'{' {
        return None;
    }
    let env: Envelope = serde_json::from_slice(payload).ok()?;
    if env.v != 1 || !(1..=l.max_events).contains(&env.count) || env.created_ms < 0 {
        return None;
    }
    let n = env.count as usize;
    if !chars_within(&env.batch_id.0, 1, l.id) {
        return None;
    }
    if let Some(s) = &env.source {
        if !chars_within(&s.0, 0, l.source) {
            return None;
        }
    }
    if env.producer.is_some() || env.seq.is_some() {
        match (&env.producer, env.seq) {
            (Some(p), Some(seq)) if seq >= 0 && chars_within(&p.0, 1, l.id) => {}
            _ => return None,
        }
    }
    if env.customer.len() != n
        || env.meter.len() != n
        || env.quantity.len() != n
        || env.timestamp_ms.len() != n
    {
        return None;
    }
    if !env.customer.iter().all(|s| chars_within(&s.0, 0, l.customer))
        || !env.meter.iter().all(|s| chars_within(&s.0, 0, l.meter))
        || !env.timestamp_ms.iter().all(|&t| t >= 0)
    {
        return None;
    }
    let ids = match &env.id {
        None => None,
        Some(None) => return None,
        Some(Some(col)) => {
            if col.len() != n {
                return None;
            }
            let mut out = Vec::with_capacity(n);
            let mut any = false;
            for v in col {
                match v {
                    Some(s) if chars_within(&s.0, 1, l.id) => {
                        any = true;
                        out.push(Some(s.0.to_string()));
                    }
                    Some(_) => return None,
                    None => out.push(None),
                }
            }
            if any {
                Some(out)
            } else {
                None
            }
        }
    };
    match &env.event_source {
        None => {}
        Some(None) => return None,
        Some(Some(col)) => {
            if col.len() != n
                || !col.iter().all(|v| v.as_ref().map_or(true, |s| chars_within(&s.0, 1, l.source)))
            {
                return None;
            }
        }
    }
    let mut strings = Interner::new();
    let customer: Vec<u32> = env.customer.iter().map(|s| strings.code(&s.0)).collect();
    let meter: Vec<u32> = env.meter.iter().map(|s| strings.code(&s.0)).collect();
    let mut dim_pairs = Vec::new();
    let dim_start = match &env.dimensions {
        None => None,
        Some(None) => return None,
        Some(Some(col)) => {
            if col.len() != n {
                return None;
            }
            let mut starts = Vec::with_capacity(n + 1);
            starts.push(0u32);
            for dims in col {
                if let Some(d) = dims {
                    if d.0.len() > l.dims {
                        return None;
                    }
                    for (k, v) in &d.0 {
                        if !chars_within(&k.0, 1, l.key) || !chars_within(&v.0, 0, l.value) {
                            return None;
                        }
                        dim_pairs.push((strings.code(&k.0), strings.code(&v.0)));
                    }
                }
                starts.push(dim_pairs.len() as u32);
            }
            if dim_pairs.is_empty() {
                None
            } else {
                Some(starts)
            }
        }
    };
    let abs_sum: u128 = env.quantity.iter().map(|q| q.unsigned_abs() as u128).sum();
    let max_timestamp = env.timestamp_ms.iter().copied().max().unwrap_or(0);
    Some(NativeBatch {
        batch_id: env.batch_id.0.into_owned(),
        created_ms: env.created_ms,
        producer: env.producer.map(|p| p.0.into_owned()),
        seq: env.seq,
        source: env.source.map(|s| s.0.into_owned()),
        max_timestamp,
        abs_sum,
        strings: strings.strings.iter().map(|s| s.to_string()).collect(),
        customer,
        meter,
        quantity: env.quantity,
        timestamp: env.timestamp_ms,
        ids,
        dim_start,
        dim_pairs,
    })
}

/// Decodes envelopes under the limits of ``meterline.core.envelope`` / ``core.events``.
#[pyclass(frozen, module = "meterline_native")]
struct Decoder {
    limits: Limits,
}

#[pymethods]
impl Decoder {
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(max_bytes: usize, max_events: i64, id: usize, customer: usize, meter: usize,
           source: usize, dims: usize, key: usize, value: usize) -> Self {
        Decoder { limits: Limits { max_bytes, max_events, id, customer, meter, source, dims, key, value } }
    }

    /// The batch, or None: the Python reader decides this envelope.
    fn decode(&self, py: Python<'_>, payload: &[u8]) -> Option<NativeBatch> {
        let limits = &self.limits;
        py.allow_threads(|| decode_envelope(limits, payload))
    }
}

// ------------------------------------------------------------------ columns

struct MeterRule {
    allowed: Vec<String>,
    group_by: Vec<String>,
    value_property: String,
    unique: bool,
    allow_negative: bool,
}

/// A meter's rule with its names as run string codes.
struct Resolved {
    allowed: Vec<u32>,
    group_by: Vec<u32>,
    value_property: u32,
    unique: bool,
    allow_negative: bool,
}

/// The registry's meter rules and the time bounds, for ``build``.
#[pyclass(frozen, module = "meterline_native")]
struct Rules {
    meters: HashMap<String, MeterRule>,
    min_ts: i64,
    max_ts: i64,
    future_skew: i64,
    // verdict codes: unknown meter, missing customer, time, negative, dimension, unique
    codes: [i8; 6],
}

/// Everything ``build`` computes, before it becomes Python objects.
struct Built {
    customer: Vec<i64>,
    customers: Vec<u32>,
    meter: Vec<i64>,
    meters: Vec<u32>,
    group: Vec<i64>,
    groups: Vec<Vec<Vec<u32>>>, // per meter code: the group value tuples
    reason: Vec<i8>,
    has_id: Vec<u8>,
    unique: Option<Vec<Option<u32>>>,
    max_timestamp: Vec<i64>,
}

fn first_seen(map: &mut Vec<i64>, list: &mut Vec<u32>, code: u32) -> (i64, bool) {
    let c = code as usize;
    if c >= map.len() {
        map.resize(c + 1, -1);
    }
    if map[c] < 0 {
        map[c] = list.len() as i64;
        list.push(code);
        return (map[c], true);
    }
    (map[c], false)
}

impl Rules {
    fn build_run<'a>(&'a self, batches: &[&'a NativeBatch], now_ms: &[i64],
                     run: &mut Interner<'a>) -> Built {
        let n: usize = batches.iter().map(|b| b.quantity.len()).sum();
        let empty = run.code("");
        let [c_unknown, c_customer, c_time, c_negative, c_dimension, c_unique] = self.codes;
        let mut out = Built {
            customer: Vec::with_capacity(n),
            customers: Vec::new(),
            meter: Vec::with_capacity(n),
            meters: Vec::new(),
            group: Vec::with_capacity(n),
            groups: Vec::new(),
            reason: Vec::with_capacity(n),
            has_id: Vec::with_capacity(n),
            unique: None,
            max_timestamp: Vec::with_capacity(batches.len()),
        };
        let (mut customer_of, mut meter_of) = (Vec::new(), Vec::new());
        let mut resolved: Vec<Option<Resolved>> = Vec::new();
        let mut group_codes: HashMap<Vec<u32>, i64> = HashMap::new();
        let mut key: Vec<u32> = Vec::with_capacity(8);
        let mut unique: Vec<Option<u32>> = Vec::new();
        let mut any_unique = false;
        for (r, b) in batches.iter().enumerate() {
            let local: Vec<u32> = b.strings.iter().map(|s| run.code(s)).collect();
            let newest_ok = (now_ms[r].saturating_add(self.future_skew)).min(self.max_ts - 1);
            out.max_timestamp.push(b.max_timestamp);
            for i in 0..b.quantity.len() {
                let (cust, _) = first_seen(&mut customer_of, &mut out.customers, local[b.customer[i] as usize]);
                let (m, new_meter) = first_seen(&mut meter_of, &mut out.meters, local[b.meter[i] as usize]);
                if new_meter {
                    let name = run.strings[out.meters[m as usize] as usize];
                    let rule = self.meters.get(name).map(|rule| Resolved {
                        allowed: rule.allowed.iter().map(|s| run.code(s)).collect(),
                        group_by: rule.group_by.iter().map(|s| run.code(s)).collect(),
                        value_property: run.code(&rule.value_property),
                        unique: rule.unique,
                        allow_negative: rule.allow_negative,
                    });
                    resolved.push(rule);
                    out.groups.push(Vec::new());
                }
                out.customer.push(cust);
                out.meter.push(m);
                out.has_id.push(matches!(&b.ids, Some(ids) if ids[i].is_some()) as u8);
                let dims: &[(u32, u32)] = match &b.dim_start {
                    Some(s) => &b.dim_pairs[s[i] as usize..s[i + 1] as usize],
                    None => &[],
                };
                let (q, ts) = (b.quantity[i], b.timestamp[i]);
                let Some(rule) = &resolved[m as usize] else {
                    out.group.push(0);
                    out.reason.push(c_unknown);
                    unique.push(None);
                    continue;
                };
                // The group, for every event of a known meter (valid or not), as the
                // Python builder does: the codes only have to agree within the run.
                let lookup = |name: u32| {
                    dims.iter().find(|(k, _)| local[*k as usize] == name).map(|(_, v)| local[*v as usize])
                };
                key.clear();
                key.push(m as u32);
                key.extend(rule.group_by.iter().map(|&g| lookup(g).unwrap_or(empty)));
                let g = match group_codes.get(key.as_slice()) {
                    Some(&g) => g,
                    None => {
                        let g = out.groups[m as usize].len() as i64;
                        out.groups[m as usize].push(key[1..].to_vec());
                        group_codes.insert(key.clone(), g);
                        g
                    }
                };
                out.group.push(g);
                let value = if rule.unique { lookup(rule.value_property) } else { None };
                if rule.unique {
                    any_unique = true;
                }
                unique.push(value);
                // MeterPlan.check's order, after unknown meter and missing customer.
                let verdict = if local[b.customer[i] as usize] == empty {
                    c_customer
                } else if ts < self.min_ts || ts > newest_ok {
                    c_time
                } else if q < 0 && !rule.allow_negative {
                    c_negative
                } else if dims.is_empty() {
                    if rule.unique { c_unique } else { 0 }
                } else if !dims.iter().all(|(k, _)| rule.allowed.contains(&local[*k as usize])) {
                    c_dimension
                } else if rule.unique && value.map_or(true, |v| v == empty) {
                    c_unique
                } else {
                    0
                };
                out.reason.push(verdict);
            }
        }
        if any_unique {
            out.unique = Some(unique);
        }
        out
    }
}

fn bytes_of<'py, T: Copy>(py: Python<'py>, v: &[T]) -> Bound<'py, PyByteArray> {
    // SAFETY: plain integers, read as bytes for numpy.frombuffer (native byte order).
    let raw = unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) };
    PyByteArray::new(py, raw)
}

#[pymethods]
impl Rules {
    /// ``meters``: (name, allowed dimensions, group_by, value_property, unique,
    /// allow_negative) per meter of the registry.
    #[new]
    fn new(meters: Vec<(String, Vec<String>, Vec<String>, String, bool, bool)>, min_ts: i64,
           max_ts: i64, future_skew: i64, codes: [i8; 6]) -> Self {
        let meters = meters
            .into_iter()
            .map(|(name, allowed, group_by, value_property, unique, allow_negative)| {
                (name, MeterRule { allowed, group_by, value_property, unique, allow_negative })
            })
            .collect();
        Rules { meters, min_ts, max_ts, future_skew, codes }
    }

    /// Columns of a run: (customer codes, customers, meter codes, meters, quantity,
    /// timestamp, group codes, groups per meter, verdicts, has_id, ids or None, unique
    /// values or None, max timestamp per record). Integer columns are bytearrays of
    /// int64 (verdicts int8, has_id bool) for numpy.frombuffer.
    fn build<'py>(&self, py: Python<'py>, batches: Vec<Bound<'py, NativeBatch>>,
                  now_ms: Vec<i64>) -> PyResult<Bound<'py, PyTuple>> {
        if now_ms.len() != batches.len() {
            return Err(pyo3::exceptions::PyValueError::new_err("one now_ms per batch"));
        }
        let refs: Vec<&NativeBatch> = batches.iter().map(|b| b.get()).collect();
        let mut run = Interner::new();
        let built = py.allow_threads(|| self.build_run(&refs, &now_ms, &mut run));
        let names = |codes: &[u32]| -> Vec<Bound<'py, PyString>> {
            codes.iter().map(|&c| PyString::new(py, run.strings[c as usize])).collect()
        };
        let quantity: Vec<i64> = refs.iter().flat_map(|b| b.quantity.iter().copied()).collect();
        let timestamp: Vec<i64> = refs.iter().flat_map(|b| b.timestamp.iter().copied()).collect();
        let groups = PyList::empty(py);
        for meter_groups in &built.groups {
            let tuples = PyList::empty(py);
            for values in meter_groups {
                tuples.append(PyTuple::new(py, names(values))?)?;
            }
            groups.append(tuples)?;
        }
        let ids: PyObject = if refs.iter().any(|b| b.ids.is_some()) {
            let list = PyList::empty(py);
            for b in &refs {
                match &b.ids {
                    Some(ids) => {
                        for id in ids {
                            list.append(id.as_deref())?;
                        }
                    }
                    None => {
                        for _ in 0..b.quantity.len() {
                            list.append(py.None())?;
                        }
                    }
                }
            }
            list.into_any().unbind()
        } else {
            py.None()
        };
        let unique: PyObject = match &built.unique {
            Some(values) => {
                let list = PyList::empty(py);
                for v in values {
                    match v {
                        Some(c) => list.append(run.strings[*c as usize])?,
                        None => list.append(py.None())?,
                    }
                }
                list.into_any().unbind()
            }
            None => py.None(),
        };
        let items: Vec<PyObject> = vec![
            bytes_of(py, &built.customer).into_any().unbind(),
            PyList::new(py, names(&built.customers))?.into_any().unbind(),
            bytes_of(py, &built.meter).into_any().unbind(),
            PyList::new(py, names(&built.meters))?.into_any().unbind(),
            bytes_of(py, &quantity).into_any().unbind(),
            bytes_of(py, &timestamp).into_any().unbind(),
            bytes_of(py, &built.group).into_any().unbind(),
            groups.into_any().unbind(),
            bytes_of(py, &built.reason).into_any().unbind(),
            bytes_of(py, &built.has_id).into_any().unbind(),
            ids,
            unique,
            PyList::new(py, &built.max_timestamp)?.into_any().unbind(),
        ];
        PyTuple::new(py, items)
    }
}

#[pymodule]
fn meterline_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Decoder>()?;
    m.add_class::<NativeBatch>()?;
    m.add_class::<Rules>()?;
    m.add_class::<windows::WindowStore>()?;
    Ok(())
}
