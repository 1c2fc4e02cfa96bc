"""The columnar rollup fold: a fetch of envelopes folded column-wise (numpy), with the
per-event fold of ``meterline.core.rollup`` as its reference (issue 14).

``ColumnarPartitionProcessor.process_many`` is the entry point; its module docstring says
how the record-order rules (dedupe first-wins, the per-record watermark) are kept exact.
"""

from meterline.aggregators.columnar.processor import ColumnarPartitionProcessor, ColumnarStats

__all__ = ["ColumnarPartitionProcessor", "ColumnarStats"]
