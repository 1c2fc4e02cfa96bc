"""Request bodies -> event drafts, one module per wire format.

Each reader returns a list with one entry per event in the request: a ``Draft`` or, when
the event could not even be read (not an object, a field of the wrong JSON type), an
``EventError`` for that index. Whole-body problems (not JSON, wrong top-level shape) raise
``Problem``. Meter-specific reading (which data field is the value, which are dimensions)
follows the meter registry, as OpenMeter's value_property/groupBy and Lago's field_name do.
"""
