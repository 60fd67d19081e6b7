# %% [markdown]
# # 01 · Tokenizers: text to integers and back
#
# A language model reads and writes integers, not letters. A *tokenizer* is the pair of maps
# between the two: `encode(text) -> ids` and `decode(ids) -> text`. Three kinds, from the simplest:
#
# 1. one id per **character** seen in the training text,
# 2. one id per UTF-8 **byte** (256 ids cover every text there is),
# 3. **byte-pair encoding** (BPE): start from bytes and learn to glue frequent pairs into new tokens.
#
# We write the first two by hand and check them against `lmforge.tokenizer`; for BPE we write the
# merge loop by hand and then use lmforge's trained one.

# %%
import warnings

from lmforge.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer, UnknownCharWarning

text = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
        "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n")

# %% [markdown]
# ## Characters
#
# The vocabulary is the sorted set of characters in the text; a character's id is its place in
# that list. Encoding is a dictionary lookup, decoding the reverse lookup.

# %%
chars = sorted(set(text))
stoi = {c: i for i, c in enumerate(chars)}  # string -> id
itos = {i: c for c, i in stoi.items()}  # id -> string


def encode(s):
    return [stoi[c] for c in s]


def decode(ids):
    return "".join(itos[i] for i in ids)


print(len(chars), "characters:", repr("".join(chars)))
print(encode("hear me"), "->", repr(decode(encode("hear me"))))
assert decode(encode(text)) == text

# %% [markdown]
# lmforge's `CharTokenizer` builds the same table, with four *special tokens* in front
# (`<|pad|>`, `<|unk|>`, `<|bos|>`, `<|eos|>`, ids 0-3): padding, "unknown character", beginning and
# end of a sequence. So every character's id is ours plus 4.

# %%
tok = CharTokenizer.train([text])
n_special = len(tok.special_tokens)
print(tok.special_tokens, "vocab_size", tok.vocab_size)

assert tok.vocab_size == len(chars) + n_special
assert tok.encode(text) == [i + n_special for i in encode(text)]
assert tok.decode(tok.encode(text)) == text
print(tok.encode("hear me", add_bos=True, add_eos=True))

# %% [markdown]
# Our hand-written `encode` raises a `KeyError` on a character it never saw. lmforge maps it to
# `<|unk|>` instead and warns once: the text still encodes, but the round trip is lossy.

# %%
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ids = tok.encode("Zounds!")
print(ids, "->", repr(tok.decode(ids, skip_special_tokens=False)))
assert tok.unk_id in ids and any(issubclass(w.category, UnknownCharWarning) for w in caught)

# %% [markdown]
# ## Bytes
#
# UTF-8 writes every character as 1 to 4 bytes, so the 256 byte values are a vocabulary that never
# meets an unknown character. The price: non-ASCII text takes several ids per character.

# %%
s = "héllo, wörld ✓"
byte_ids = list(s.encode("utf-8"))  # one id per byte, 0..255
print(len(s), "characters ->", len(byte_ids), "bytes:", byte_ids)
assert bytes(byte_ids).decode("utf-8") == s

byte_tok = ByteTokenizer()  # ids 0-255 are the bytes; the special tokens come after them
assert byte_tok.encode(s) == byte_ids
assert byte_tok.decode(byte_ids) == s
print("vocab_size", byte_tok.vocab_size, "eos id", byte_tok.eos_id)

# %% [markdown]
# ## Byte-pair encoding, by hand
#
# Characters make sequences long; whole words make the vocabulary huge. BPE sits between: start from
# bytes, find the most frequent adjacent pair of ids, give it a new id, replace every occurrence,
# and repeat. Each merge shortens the sequence; the list of merges *is* the tokenizer.

# %%
def most_frequent_pair(ids):
    counts = {}
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + 1
    return max(counts, key=counts.get)


def merge(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


ids = list(text.encode("utf-8"))
vocab = {i: bytes([i]) for i in range(256)}  # id -> the bytes it stands for
merges = []
for new_id in range(256, 256 + 20):
    pair = most_frequent_pair(ids)
    ids = merge(ids, pair, new_id)
    merges.append(pair)
    vocab[new_id] = vocab[pair[0]] + vocab[pair[1]]
print(len(text.encode("utf-8")), "bytes ->", len(ids), "tokens after", len(merges), "merges")
print("learned tokens:", [vocab[i].decode("utf-8", "replace") for i in range(256, 256 + len(merges))])


def bpe_encode(s):
    ids = list(s.encode("utf-8"))
    for new_id, pair in enumerate(merges, start=256):  # apply the merges in the order they were learned
        ids = merge(ids, pair, new_id)
    return ids


def bpe_decode(ids):
    return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")


assert bpe_decode(bpe_encode(text)) == text
assert bpe_decode(bpe_encode("a text it never saw ✓")) == "a text it never saw ✓"  # bytes cover everything

# %% [markdown]
# lmforge's `BPETokenizer` trains the same idea with Hugging Face `tokenizers` (GPT-2's byte-level
# BPE). One difference: it first splits the text into words (a space travels with the word after
# it), so no token spans two words; its merges therefore differ from ours. What both guarantee is
# the round trip on *any* text.

# %%
bpe = BPETokenizer.train([text] * 20, vocab_size=300, min_frequency=2)
pieces = [bpe.id_to_token(i) for i in bpe.encode("First Citizen: speak.")]
print(bpe.vocab_size, "ids;", pieces)  # 'Ġ' is how byte-level BPE shows a space
for s in (text, "a text it never saw ✓"):
    assert bpe.decode(bpe.encode(s)) == s
print(len(text), "characters ->", len(bpe.encode(text)), "BPE tokens")

# %% [markdown]
# **Next:** [02 · bigram](02_bigram.ipynb) turns these ids into the simplest language model.
