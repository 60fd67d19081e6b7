"""``pretrain`` is the run pipeline with its historical name (``lmforge pretrain`` = ``lmforge train``).

Kept so older scripts keep working; the pipeline lives in :mod:`lmforge.train.run` and the LM
pieces in :mod:`lmforge.tasks.lm`.
"""

from lmforge.tasks.common import build_tokenizer, source_specs
from lmforge.tasks.lm import MASK, WindowBatches, build_token_store, eval_batches, sample_text
from lmforge.train.run import run as pretrain

__all__ = ["pretrain", "build_tokenizer", "build_token_store", "WindowBatches", "eval_batches", "sample_text",
           "source_specs", "MASK"]
