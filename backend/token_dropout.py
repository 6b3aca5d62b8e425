"""Dropout keyed by token: masks that do not depend on how a batch is split or laid out.

A batch's dropout masks normally come from a random stream over the batch's flat layout, so
the mask a token gets depends on which examples share its batch and where it sits. Inside
token_keys(), every array whose rows are the batch's tokens (the padded batch, its packed
real tokens, or the query rows of a cpu_kernels.PackedRows made inside the block) is dropped
row by row: row r hashes its columns under the call's seed mixed with its token's key
(example id << 12) + position, and attention probabilities under (the query token's key,
head) with the key positions as columns. The call's seed words come from the block's seed
and the call's number (the k-th dropout of a forward is the same layer in every forward),
not from Jittor's generator, whose random ops draw when the graph runs, in an order set by
the graph: so a global batch split into any micro-batches and processes draws the same
masks. A call finds its row keys by its number of rows, which tells the layouts of one
batch apart.

Both implementations draw these masks, bit for bit the same: the fused CPU kernels
(csrc/common.h: hash32 and Drop) and the plain Jittor path (KeyedDropout below, Jittor ops
on any device, which runtime.prepare puts in place of nn.Dropout). Outside token_keys(),
KeyedDropout is nn.Dropout.
"""
from contextlib import contextmanager

import numpy as np

from backend.jittor_env import jt
from jittor import nn

# ----------------------------------------------------------------------------
# The keys of one forward


class _TokenKeys:
    def __init__(self, seed):
        self.seed, self.calls, self.rows = seed, 0, {}  # rows -> int32 Var of the row keys


_keys = None  # a _TokenKeys inside token_keys(), else None


def _token_key_array(example_ids, positions):
    key = (np.asarray(example_ids, np.int64) << 12) + np.asarray(positions, np.int64)
    return (key & 0xFFFFFFFF).astype(np.uint32).view(np.int32)  # 32-bit keys; the hash mixes them


@contextmanager
def token_keys(example_ids, attention_mask, seed):
    """Key the dropout masks of the one forward run inside this block by token (see above).

    example_ids: (B,) ints that name the batch's examples wherever they are trained (e.g.
    their index in the training set); attention_mask: (B, T), 1 = real token, right-padded;
    seed: a non-negative int (e.g. from the training step), the same for every piece of a
    batch that must draw as one.
    """
    global _keys
    mask = np.asarray(attention_mask) > 0
    B, T = mask.shape
    positions = np.broadcast_to(np.arange(T), (B, T))
    padded = _token_key_array(np.repeat(np.asarray(example_ids), T), positions.reshape(-1))
    _keys = _TokenKeys(seed)
    try:
        register(B * T, padded)
        register(int(mask.sum()), padded[mask.reshape(-1)])  # the real tokens, row-major (PackedRows)
        yield
    finally:
        _keys = None


def active():
    return _keys is not None


def register(rows, keys):
    """Make `keys` (int32, one per row) the token keys of arrays with `rows` rows in this forward."""
    old = _keys.rows.get(rows)
    if old is not None and not np.array_equal(old.numpy(), keys):
        raise RuntimeError(f"token_keys: two token layouts of {rows} rows; their dropout keys would be ambiguous")
    _keys.rows[rows] = jt.array(keys)


def row_keys(rows):
    """(int32 Var of the keys of `rows` token rows, 1.0) inside token_keys(), else (placeholder, 0.0)."""
    if _keys is None:
        return jt.zeros((1,), "int32"), 0.0
    if rows not in _keys.rows:
        raise RuntimeError(f"token_keys: no token layout of {rows} rows in this batch (have {sorted(_keys.rows)})")
    return _keys.rows[rows], 1.0


def call_seed():
    """The next dropout call's two 24-bit seed words (int32 numpy) inside token_keys(), else None."""
    if _keys is None:
        return None
    _keys.calls += 1
    return (np.random.SeedSequence((_keys.seed, _keys.calls)).generate_state(2) >> np.uint32(8)).astype(np.int32)


# ----------------------------------------------------------------------------
# The masks in Jittor ops: csrc/common.h's hash32 and Drop, whose uint32 arithmetic wraps.
# Jittor's integers are int32 (it stores uint32 and int64 arrays as int32), so the same
# bits are computed in int32: + * ^ give the same bits as in uint32 (two's complement), a
# right shift is made logical by masking off the copied sign bits, and the unsigned
# comparison is a signed one with the sign bits flipped.

def _i32(value):
    """A (1,) int32 Var with the bits of the 32-bit unsigned `value`."""
    return jt.array(np.array([value & 0xFFFFFFFF], np.uint32).view(np.int32))


def _shr(z, k):
    return (z >> k) & _i32((1 << (32 - k)) - 1)  # logical shift


def hash32(s0, s1, i):
    """csrc/common.h's hash32(s0, s1, i) on int32 Vars holding uint32 bits (broadcast)."""
    z = (i * _i32(0x9E3779B9) + s0) ^ s1
    z = z ^ _shr(z, 16)
    z = z * _i32(0x85EBCA6B)
    z = z ^ _shr(z, 13)
    z = z * _i32(0xC2B2AE35)
    return z ^ _shr(z, 16)


def keep_scale(shape, p, words, keys):
    """The kept elements' 1 / (1 - p), else 0, as float32 of `shape`: rows (all but the last
    dimension, row-major) keyed by `keys` (int32 Var), columns hashed in order; for the
    (B, H, Tq, Tk) attention probabilities, the rows are the (B, Tq) query tokens, then the
    head, then the key position (what csrc/attention.h draws). words: call_seed()'s."""
    s0, s1 = _i32(int(words[0])), _i32(int(words[1]) * 0x01000193)  # Drop's seed words
    token = hash32(s0, s1, keys)
    if len(shape) == 4:  # attention: (B, H, Tq, Tk)
        B, H, Tq, Tk = shape
        row = hash32(token.reshape(B, 1, Tq, 1), s1, jt.arange(H).reshape(1, H, 1, 1))
    else:
        row = token.reshape(*shape[:-1], 1)
    cols = jt.arange(shape[-1]).reshape(*([1] * (len(shape) - 1)), shape[-1])
    threshold = min(4294967295, int(p * 4294967296.0))  # kept: hash >= threshold, unsigned
    kept = (hash32(row, s1, cols) ^ _i32(1 << 31)) >= _i32(threshold ^ (1 << 31))
    return kept.float32() * float(np.float32(1.0 / (1.0 - p)))


class KeyedDropout(nn.Dropout):
    """nn.Dropout; inside token_keys(), the token-keyed masks (the fused kernels' masks, in
    Jittor ops). Attention probabilities are told apart by their 4 dimensions."""

    def execute(self, x):
        if not (self.is_train and 0 < self.p < 1 and active()):
            return super().execute(x)
        rows = int(np.prod(x.shape[:-1])) if x.ndim != 4 else x.shape[0] * x.shape[2]
        keys, _ = row_keys(rows)
        # scaled in float32 and rounded once, as torch and nn.Dropout do: in bf16 the scale itself
        # would round (bf16(1 / 0.9) = 1.109375, every kept element 0.16% too small)
        scale = keep_scale(tuple(x.shape), self.p, call_seed(), keys)
        return x * scale if x.dtype == "float32" else (x.float32() * scale).cast(x.dtype)
