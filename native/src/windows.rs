//! The columnar fold's window state in compiled arrays (issue 14).
//!
//! With the decoder compiled, most of the worker's time went to the window state as
//! Python objects: per window and fetch a key tuple, a dict lookup comparing tuples, a
//! cell, a set insert, and per flush a `RollupRecord` (docs/benchmarks.md). Here the
//! windows of sum, count, min and max (exact `i128` states, wide enough for any
//! Decimal(38, 9) total) and unique_count (a set of the values) live in one hash map
//! keyed by integer codes:
//!
//! - `merge` folds a run's accepted events in log order, hourly window before daily,
//!   exactly as `RollupState.apply_batch` adds them (the caller has already decided which
//!   events count and checked that no total can leave the range).
//! - A window the Python state has taken over (`lift`, `claim`: the per-event fold, or an
//!   aggregation kept in Python) stays here as a *python-owned* marker; `merge` hands its
//!   events back so they are folded by the Python code, and never holds the window twice.
//! - `take_dirty` returns the changed windows as the lists of a rollup column block (no
//!   object per row but the ints), `export_json` writes the windows as checkpoint JSON.
//!
//! Nothing here decides what counts; the equivalence property test runs it against the
//! per-event fold (tests/aggregators/columnar/test_columnar_equivalence.py).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyList, PyString, PyTuple};

const SUM: u8 = 0;
const COUNT: u8 = 1;
const MIN: u8 = 2;
const MAX: u8 = 3;
const UNIQUE: u8 = 4;
const SCALE: i128 = 1_000_000_000;
const SIZES: [i64; 2] = [3_600_000, 86_400_000]; // hourly, daily
const WINDOW_NAMES: [&str; 2] = ["hourly", "daily"];
const AGG_NAMES: [&str; 5] = ["sum", "count", "min", "max", "unique_count"];

/// FxHash: the keys are small integers made here, not attacker-chosen strings (customer
/// names are interned through a SipHash map first), so a fast non-keyed hash is safe.
#[derive(Default)]
struct Fx(u64);

impl Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.write_u64(i as u64);
    }
    fn write_u32(&mut self, i: u32) {
        self.write_u64(i as u64);
    }
    fn write_i64(&mut self, i: i64) {
        self.write_u64(i as u64);
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<Fx>>;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct WKey {
    start: i64,
    customer: u32,
    meter: u32,
    group: u32,
    kind: u8,
}

struct Slot {
    key: WKey,
    state: i128, // sum: the total; count: the events; min/max: the extreme quantity
    // unique_count: the distinct values (SipHash: they are user-chosen strings); boxed
    // so the other windows' slots stay small
    #[allow(clippy::box_collection)]
    values: Option<Box<HashSet<Box<str>>>>,
    events: i64,
    dirty: bool,
    python: bool, // held by the Python state: only a marker here
    live: bool,
}

struct Meter {
    name: Py<PyString>,
    json: String,
    agg: u8,
}

struct Customer {
    name: Py<PyString>,
    raw: String,
    json: String,
}

struct Group {
    tuple: PyObject,
    json: String,
}

#[pyclass(module = "meterline_native")]
pub struct WindowStore {
    map: FxMap<WKey, u32>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    dirty: Vec<u32>,
    held: usize, // live slots not owned by Python
    customer_ids: HashMap<String, u32>,
    customers: Vec<Customer>,
    meters: Vec<Meter>,
    groups: Vec<Group>,
    min_end: i64, // no slot's window ends before this: eviction can stop early
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("a str always serialises")
}

/// Sorted as Python sorts str (UTF-8 byte order is code point order).
fn sorted(set: &HashSet<Box<str>>) -> Vec<&str> {
    let mut v: Vec<&str> = set.iter().map(|s| &**s).collect();
    v.sort_unstable();
    v
}

fn i64_buffer(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<Vec<i64>> {
    PyBuffer::<i64>::get(obj)?.to_vec(py)
}

fn bytes_of(py: Python<'_>, v: &[i64]) -> PyObject {
    // SAFETY: plain integers, read as bytes for numpy.frombuffer (native byte order).
    let raw = unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) };
    PyByteArray::new(py, raw).into_any().unbind()
}

impl WindowStore {
    fn key(&self, kind: u8, customer: u32, meter: u32, group: u32, start: i64) -> PyResult<WKey> {
        if kind > 1 || customer as usize >= self.customers.len()
            || meter as usize >= self.meters.len() || group as usize >= self.groups.len() {
            return Err(PyValueError::new_err("window key with an unknown code"));
        }
        Ok(WKey { start, customer, meter, group, kind })
    }

    fn alloc(&mut self, key: WKey, state: i128, events: i64, python: bool) -> u32 {
        let values = if !python && self.meters[key.meter as usize].agg == UNIQUE {
            Some(Box::default())
        } else {
            None
        };
        let slot = Slot { key, state, values, events, dirty: false, python, live: true };
        let at = match self.free.pop() {
            Some(at) => {
                self.slots[at as usize] = slot;
                at
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        };
        self.map.insert(key, at);
        let end = key.start + SIZES[key.kind as usize];
        if end < self.min_end {
            self.min_end = end;
        }
        if !python {
            self.held += 1;
        }
        at
    }

    /// Fold events in log order; returns the events of python-owned windows per kind.
    fn merge_run(&mut self, customer: &[i64], meter: &[i64], group: &[i64], ts: &[i64],
                 qty: &[i64], values: &[Option<&str>]) -> [Vec<i64>; 2] {
        let mut handed: [Vec<i64>; 2] = [Vec::new(), Vec::new()];
        for i in 0..ts.len() {
            let (m, q) = (meter[i] as u32, qty[i] as i128);
            let agg = self.meters[m as usize].agg;
            for kind in 0..2u8 {
                let size = SIZES[kind as usize];
                let key = WKey {
                    start: ts[i] - ts[i].rem_euclid(size), // Python's floor modulo
                    customer: customer[i] as u32,
                    meter: m,
                    group: group[i] as u32,
                    kind,
                };
                let at = match self.map.get(&key) {
                    Some(&at) => at,
                    None => {
                        let first = match agg {
                            MIN | MAX => q,
                            _ => 0,
                        };
                        self.alloc(key, first, 0, false)
                    }
                };
                let slot = &mut self.slots[at as usize];
                if slot.python {
                    handed[kind as usize].push(i as i64);
                    continue;
                }
                match agg {
                    SUM => slot.state += q,
                    COUNT => slot.state += 1,
                    UNIQUE => {
                        let v = values[i].expect("a unique_count event carries its value");
                        let set = slot.values.as_mut().expect("a unique_count window has a set");
                        if !set.contains(v) {
                            set.insert(v.into());
                        }
                    }
                    MIN => {
                        if q < slot.state {
                            slot.state = q
                        }
                    }
                    _ => {
                        if q > slot.state {
                            slot.state = q
                        }
                    }
                }
                slot.events += 1;
                if !slot.dirty {
                    slot.dirty = true;
                    self.dirty.push(at);
                }
            }
        }
        handed
    }

    /// Keep only the customers of live windows (codes renumbered): the table would
    /// otherwise grow with every customer ever seen. Callers never keep codes across
    /// calls, so renumbering is invisible to them.
    fn compact_customers(&mut self) {
        let mut remap: Vec<u32> = vec![u32::MAX; self.customers.len()];
        let mut kept: Vec<Customer> = Vec::new();
        let old = std::mem::take(&mut self.customers);
        let mut old: Vec<Option<Customer>> = old.into_iter().map(Some).collect();
        self.map.clear();
        for at in 0..self.slots.len() {
            let slot = &mut self.slots[at];
            if !slot.live {
                continue;
            }
            let c = slot.key.customer as usize;
            if remap[c] == u32::MAX {
                remap[c] = kept.len() as u32;
                kept.push(old[c].take().expect("each customer moved once"));
            }
            slot.key.customer = remap[c];
            self.map.insert(slot.key, at as u32);
        }
        self.customer_ids = kept.iter().enumerate().map(|(i, c)| (c.raw.clone(), i as u32)).collect();
        self.customers = kept;
    }

    /// The aggregator's plain state (``to_plain``): an int, or the sorted values.
    fn plain(&self, py: Python<'_>, slot: &Slot) -> PyResult<PyObject> {
        match &slot.values {
            Some(set) => Ok(PyTuple::new(py, sorted(set))?.into_any().unbind()),
            None => Ok(slot.state.into_pyobject(py)?.into_any().unbind()),
        }
    }

    fn plain_json(&self, slot: &Slot, out: &mut String) {
        match &slot.values {
            Some(set) => {
                out.push('[');
                for (i, v) in sorted(set).into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&json_str(v));
                }
                out.push(']');
            }
            None => out.push_str(&slot.state.to_string()),
        }
    }

    fn result(&self, slot: &Slot) -> i128 {
        match self.meters[slot.key.meter as usize].agg {
            COUNT => slot.state * SCALE,
            UNIQUE => slot.values.as_ref().map_or(0, |v| v.len() as i128) * SCALE,
            _ => slot.state,
        }
    }
}

#[pymethods]
impl WindowStore {
    #[new]
    fn new() -> Self {
        WindowStore {
            map: FxMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            dirty: Vec::new(),
            held: 0,
            customer_ids: HashMap::new(),
            customers: Vec::new(),
            meters: Vec::new(),
            groups: Vec::new(),
            min_end: i64::MAX,
        }
    }

    /// A meter's code; ``agg``: 0 sum, 1 count, 2 min, 3 max, 4 unique_count (the caller
    /// keeps the codes).
    fn add_meter(&mut self, name: Bound<'_, PyString>, agg: u8) -> PyResult<u32> {
        if agg > UNIQUE {
            return Err(PyValueError::new_err("aggregation code must be 0..4"));
        }
        let json = json_str(name.to_str()?);
        self.meters.push(Meter { name: name.unbind(), json, agg });
        Ok((self.meters.len() - 1) as u32)
    }

    /// A dimension group's code: the tuple (as the rollup rows carry it) and its JSON.
    fn add_group(&mut self, group: Bound<'_, PyTuple>, json: String) -> u32 {
        self.groups.push(Group { tuple: group.into_any().unbind(), json });
        (self.groups.len() - 1) as u32
    }

    /// Codes of ``names`` as int64 bytes (new names get new codes).
    fn customer_codes(&mut self, py: Python<'_>, names: Vec<Bound<'_, PyString>>) -> PyResult<PyObject> {
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            out.push(self.customer_code(name)? as i64);
        }
        Ok(bytes_of(py, &out))
    }

    fn customer_code(&mut self, name: Bound<'_, PyString>) -> PyResult<u32> {
        let s = name.to_str()?;
        if let Some(&c) = self.customer_ids.get(s) {
            return Ok(c);
        }
        let c = self.customers.len() as u32;
        self.customer_ids.insert(s.to_owned(), c);
        self.customers.push(Customer { name: name.clone().unbind(), raw: s.to_owned(), json: json_str(s) });
        Ok(c)
    }

    /// Fold accepted events (int64 buffers of codes, timestamps and quantities) into
    /// their hourly and daily windows; returns (hourly, daily) int64 bytes of the event
    /// indexes whose window the Python state holds (fold those there).
    /// ``positions`` / ``values``: the events' indexes into ``values``, the list of each
    /// event's unique_count value (read for unique_count meters only; None if none).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (customer, meter, group, ts, qty, positions, values))]
    fn merge(&mut self, py: Python<'_>, customer: Bound<'_, PyAny>, meter: Bound<'_, PyAny>,
             group: Bound<'_, PyAny>, ts: Bound<'_, PyAny>, qty: Bound<'_, PyAny>,
             positions: Bound<'_, PyAny>, values: Option<Bound<'_, PyList>>)
             -> PyResult<(PyObject, PyObject)> {
        let (c, m, g) = (i64_buffer(py, &customer)?, i64_buffer(py, &meter)?, i64_buffer(py, &group)?);
        let (t, q) = (i64_buffer(py, &ts)?, i64_buffer(py, &qty)?);
        let n = t.len();
        if c.len() != n || m.len() != n || g.len() != n || q.len() != n {
            return Err(PyValueError::new_err("merge: columns of different lengths"));
        }
        let bad = |v: &[i64], limit: usize| v.iter().any(|&x| x < 0 || x as usize >= limit);
        if bad(&c, self.customers.len()) || bad(&m, self.meters.len()) || bad(&g, self.groups.len()) {
            return Err(PyValueError::new_err("merge: unknown customer, meter or group code"));
        }
        let mut held: Vec<Bound<'_, PyString>> = Vec::new();
        let mut at: Vec<Option<usize>> = vec![None; n];
        if m.iter().any(|&x| self.meters[x as usize].agg == UNIQUE) {
            let (p, values) = (i64_buffer(py, &positions)?, values.ok_or_else(|| {
                PyValueError::new_err("merge: unique_count events need their values")
            })?);
            if p.len() != n {
                return Err(PyValueError::new_err("merge: one position per event"));
            }
            for i in 0..n {
                if self.meters[m[i] as usize].agg == UNIQUE {
                    let v = values.get_item(p[i] as usize)?;
                    at[i] = Some(held.len());
                    held.push(v.downcast_into::<PyString>().map_err(|_| {
                        PyValueError::new_err("merge: a unique_count value that is not a str")
                    })?);
                }
            }
        }
        let strs: Vec<&str> = held.iter().map(|v| v.to_str()).collect::<PyResult<_>>()?;
        let vals: Vec<Option<&str>> = at.iter().map(|a| a.map(|k| strs[k])).collect();
        let handed = py.allow_threads(|| self.merge_run(&c, &m, &g, &t, &q, &vals));
        Ok((bytes_of(py, &handed[0]), bytes_of(py, &handed[1])))
    }

    /// Hand a window to the Python state: ``(plain state, events, was dirty)`` if it was
    /// held here, else None; either way it is python-owned from now on.
    fn lift(&mut self, py: Python<'_>, kind: u8, customer: u32, meter: u32, group: u32,
            start: i64) -> PyResult<Option<(PyObject, i64, bool)>> {
        let key = self.key(kind, customer, meter, group, start)?;
        match self.map.get(&key) {
            Some(&at) => {
                let slot = &mut self.slots[at as usize];
                if slot.python {
                    return Ok(None);
                }
                slot.python = true;
                let was_dirty = slot.dirty;
                slot.dirty = false; // its entry in `dirty` is skipped from now on
                self.held -= 1;
                let slot = &self.slots[at as usize];
                let plain = self.plain(py, slot)?;
                let events = slot.events;
                self.slots[at as usize].values = None;
                Ok(Some((plain, events, was_dirty)))
            }
            None => {
                self.alloc(key, 0, 0, true);
                Ok(None)
            }
        }
    }

    /// A window restored from a checkpoint.
    /// ``plain``: an int, or for a unique_count meter the list of its values.
    #[allow(clippy::too_many_arguments)]
    fn restore(&mut self, kind: u8, customer: u32, meter: u32, group: u32, start: i64,
               plain: Bound<'_, PyAny>, events: i64) -> PyResult<()> {
        let key = self.key(kind, customer, meter, group, start)?;
        if self.map.contains_key(&key) {
            return Err(PyValueError::new_err("restore: window already held"));
        }
        if self.meters[meter as usize].agg == UNIQUE {
            let values: Vec<String> = plain.extract()?;
            let at = self.alloc(key, 0, events, false);
            let set = self.slots[at as usize].values.as_mut().expect("a unique_count set");
            set.extend(values.into_iter().map(String::into_boxed_str));
        } else {
            let state: i128 = plain.extract()?;
            self.alloc(key, state, events, false);
        }
        Ok(())
    }

    /// ``(plain state, events)`` of a window held here (python-owned: None).
    fn get(&self, py: Python<'_>, kind: u8, customer: u32, meter: u32, group: u32, start: i64)
           -> PyResult<Option<(PyObject, i64)>> {
        let key = self.key(kind, customer, meter, group, start)?;
        match self.map.get(&key).map(|&at| &self.slots[at as usize]).filter(|s| !s.python) {
            Some(s) => Ok(Some((self.plain(py, s)?, s.events))),
            None => Ok(None),
        }
    }

    /// Changed windows since the last call, per kind (hourly, daily): the lists of a
    /// rollup column block (customer, meter, group, start, end, aggregation, value,
    /// events) and the same rows as buffers (``RollupBlock.buffers``), or None for a kind
    /// with none.
    fn take_dirty(&mut self, py: Python<'_>) -> PyResult<Vec<Option<Py<PyTuple>>>> {
        let mut per_kind: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
        for &at in &self.dirty {
            let slot = &mut self.slots[at as usize];
            if slot.live && slot.dirty && !slot.python {
                slot.dirty = false;
                per_kind[slot.key.kind as usize].push(at);
            }
        }
        self.dirty.clear();
        let aggs: Vec<Bound<'_, PyString>> = AGG_NAMES.iter().map(|a| PyString::intern(py, a)).collect();
        let mut out = Vec::with_capacity(2);
        for (kind, slots) in per_kind.iter().enumerate() {
            if slots.is_empty() {
                out.push(None);
                continue;
            }
            let size = SIZES[kind];
            let (customer, meter, group) = (PyList::empty(py), PyList::empty(py), PyList::empty(py));
            let (start, end, agg) = (PyList::empty(py), PyList::empty(py), PyList::empty(py));
            let (value, events) = (PyList::empty(py), PyList::empty(py));
            // The same rows as buffers for the Arrow encoder (sinks/rollup_arrow.py): codes
            // into block-local dictionaries (first appearance order) and int columns, so
            // no Python object is read per value there.
            let n = slots.len();
            let mut local: [FxMap<u32, i64>; 4] = Default::default();
            let dicts = [PyList::empty(py), PyList::empty(py), PyList::empty(py), PyList::empty(py)];
            let mut codes: [Vec<i64>; 4] = [Vec::with_capacity(n), Vec::with_capacity(n),
                                            Vec::with_capacity(n), Vec::with_capacity(n)];
            let (mut starts, mut ends, mut counts) = (Vec::with_capacity(n), Vec::with_capacity(n),
                                                      Vec::with_capacity(n));
            let mut totals: Vec<i64> = Vec::with_capacity(n);
            let mut wide = false; // a total past int64: the encoder reads the lists instead
            for &at in slots {
                let s = &self.slots[at as usize];
                let m = &self.meters[s.key.meter as usize];
                customer.append(self.customers[s.key.customer as usize].name.bind(py))?;
                meter.append(m.name.bind(py))?;
                group.append(self.groups[s.key.group as usize].tuple.bind(py))?;
                start.append(s.key.start)?;
                end.append(s.key.start + size)?;
                agg.append(&aggs[m.agg as usize])?;
                let total = self.result(s);
                value.append(total)?;
                events.append(s.events)?;
                let keys = [s.key.customer, s.key.meter, s.key.group, m.agg as u32];
                for (i, &key) in keys.iter().enumerate() {
                    let next = local[i].len() as i64;
                    let code = *local[i].entry(key).or_insert_with(|| {
                        let item: Bound<'_, PyAny> = match i {
                            0 => self.customers[key as usize].name.bind(py).clone().into_any(),
                            1 => self.meters[key as usize].name.bind(py).clone().into_any(),
                            2 => self.groups[key as usize].tuple.bind(py).clone(),
                            _ => aggs[key as usize].clone().into_any(),
                        };
                        dicts[i].append(item).expect("appending to a new list");
                        next
                    });
                    codes[i].push(code);
                }
                starts.push(s.key.start);
                ends.push(s.key.start + size);
                counts.push(s.events);
                match i64::try_from(total) {
                    Ok(v) => totals.push(v),
                    Err(_) => wide = true,
                }
            }
            let buffers = PyTuple::new(py, vec![
                bytes_of(py, &codes[0]), bytes_of(py, &codes[1]), bytes_of(py, &codes[2]),
                bytes_of(py, &codes[3]), dicts[0].clone().into_any().unbind(),
                dicts[1].clone().into_any().unbind(), dicts[2].clone().into_any().unbind(),
                dicts[3].clone().into_any().unbind(), bytes_of(py, &starts), bytes_of(py, &ends),
                if wide { py.None() } else { bytes_of(py, &totals) }, bytes_of(py, &counts),
            ])?;
            let items: Vec<PyObject> = vec![
                PyString::intern(py, WINDOW_NAMES[kind]).into_any().unbind(),
                customer.into_any().unbind(), meter.into_any().unbind(), group.into_any().unbind(),
                start.into_any().unbind(), end.into_any().unbind(), agg.into_any().unbind(),
                value.into_any().unbind(), events.into_any().unbind(), buffers.into_any().unbind(),
            ];
            out.push(Some(PyTuple::new(py, items)?.unbind()));
        }
        Ok(out)
    }

    /// Drop every window (python-owned markers too) ending at or before ``limit``.
    fn evict(&mut self, limit: i64) {
        if limit < self.min_end {
            return;
        }
        let mut min_end = i64::MAX;
        for at in 0..self.slots.len() {
            let slot = &mut self.slots[at];
            if !slot.live {
                continue;
            }
            let end = slot.key.start + SIZES[slot.key.kind as usize];
            if end <= limit {
                slot.live = false;
                slot.dirty = false;
                slot.values = None;
                if !slot.python {
                    self.held -= 1;
                }
                let key = slot.key;
                self.map.remove(&key);
                self.free.push(at as u32);
            } else if end < min_end {
                min_end = end;
            }
        }
        self.min_end = min_end;
        if self.customers.len() > 65_536 && self.customers.len() > 4 * self.map.len() {
            self.compact_customers();
        }
    }

    /// Windows held here (not python-owned).
    fn __len__(&self) -> usize {
        self.held
    }

    /// Changed windows not yet taken.
    fn dirty_count(&self) -> usize {
        self.dirty.iter().filter(|&&at| {
            let s = &self.slots[at as usize];
            s.live && s.dirty && !s.python
        }).count()
    }

    /// The largest |total| of a sum window held here.
    fn max_abs_sum(&self) -> u128 {
        self.slots.iter()
            .filter(|s| s.live && !s.python && self.meters[s.key.meter as usize].agg == SUM)
            .map(|s| s.state.unsigned_abs())
            .max()
            .unwrap_or(0)
    }

    /// Keys of the windows held here: (window, customer, meter, group, start) tuples.
    fn window_keys(&self, py: Python<'_>) -> PyResult<Vec<Py<PyTuple>>> {
        let mut out = Vec::with_capacity(self.held);
        for s in self.slots.iter().filter(|s| s.live && !s.python) {
            let items: Vec<PyObject> = vec![
                PyString::intern(py, WINDOW_NAMES[s.key.kind as usize]).into_any().unbind(),
                self.customers[s.key.customer as usize].name.clone_ref(py).into_any(),
                self.meters[s.key.meter as usize].name.clone_ref(py).into_any(),
                self.groups[s.key.group as usize].tuple.clone_ref(py),
                s.key.start.into_pyobject(py)?.into_any().unbind(),
            ];
            out.push(PyTuple::new(py, items)?.unbind());
        }
        Ok(out)
    }

    /// The windows held here as checkpoint cells, ``[window, customer, meter, group,
    /// start, aggregation, plain, events]`` JSON arrays joined by commas (no brackets).
    fn export_json(&self, py: Python<'_>) -> Vec<u8> {
        py.allow_threads(|| {
            let mut out = String::with_capacity(self.held * 96);
            for s in self.slots.iter().filter(|s| s.live && !s.python) {
                if !out.is_empty() {
                    out.push(',');
                }
                let m = &self.meters[s.key.meter as usize];
                out.push_str("[\"");
                out.push_str(WINDOW_NAMES[s.key.kind as usize]);
                out.push_str("\",");
                out.push_str(&self.customers[s.key.customer as usize].json);
                out.push(',');
                out.push_str(&m.json);
                out.push(',');
                out.push_str(&self.groups[s.key.group as usize].json);
                out.push(',');
                out.push_str(&s.key.start.to_string());
                out.push_str(",\"");
                out.push_str(AGG_NAMES[m.agg as usize]);
                out.push_str("\",");
                self.plain_json(s, &mut out);
                out.push(',');
                out.push_str(&s.events.to_string());
                out.push(']');
            }
            out.into_bytes()
        })
    }
}
