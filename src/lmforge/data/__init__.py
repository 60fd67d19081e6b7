"""Data: documents from anywhere (sources), offline corpora (builtin), and the token store.

``SourceSpec`` + ``iter_documents`` read text from built-in corpora, local files, folders,
globs and Hugging Face datasets; ``TokenStore.build`` tokenizes once into memory-mapped
train/val arrays (cached by content); ``random_windows`` / ``sequential_windows`` cut
(input, next-token target) batches from them.
"""

from lmforge.data.builtin import (
    arithmetic,
    arithmetic_documents,
    arithmetic_problems,
    arithmetic_text,
    iter_stories,
    stories,
)
from lmforge.data.sources import SourceSpec, iter_documents, source_fingerprint
from lmforge.data.tokens import (
    TokenStore,
    check_fits,
    num_sequential_windows,
    random_windows,
    sequential_windows,
    token_dtype,
)

__all__ = [
    "SourceSpec",
    "TokenStore",
    "arithmetic",
    "arithmetic_documents",
    "arithmetic_problems",
    "arithmetic_text",
    "check_fits",
    "iter_documents",
    "iter_stories",
    "num_sequential_windows",
    "random_windows",
    "sequential_windows",
    "source_fingerprint",
    "stories",
    "token_dtype",
]
