"""Output watermark: a keyed green list on sampling, applied only where code has freedom.

Kirchenbauer et al. 2023 ("A Watermark for Large Language Models", Alg. 2): before sampling
token s_t, a key and the previous token s_{t-1} split the vocabulary into a green list of
γ·|V| tokens and a red list, and δ is added to every green logit. Text from the model then holds
more green tokens than the γ fraction chance gives, and the one-proportion z-test

    z = (|s|_G - γT) / √(T γ (1 - γ))

over T scored tokens tells it from human text (§4). Code has many tokens with one right answer
(`)` after `print(x`), where the bias either does nothing or breaks the program; SWEET (Lee et
al. 2023, "Who Wrote this Code? Watermarking for Code Generation", §3) adds δ only where the
entropy of the model's next-token distribution is at least τ, and scores only those positions.
Detection then needs the model's entropies; without them every token is scored (still valid,
weaker). Repeated (s_{t-1}, s_t) pairs are scored once (Kirchenbauer et al. 2023b, "On the
Reliability of Watermarks", §3), because code repeats itself and repeats would inflate z on
human text.

The green list is a PRF, not a seeded shuffle: token v is green after u iff its 16-bit value
in AES-256(k, u ‖ ⌊v/8⌋) falls below γ·2¹⁶, k = HKDF(customer's watermark secret).
p-values are the exact binomial tail P(X ≥ |s|_G), X ~ Bin(T, γ).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

GAMMA = 0.25  # Kirchenbauer et al. §6 and SWEET §4 use γ = 0.25
DELTA = 3.0  # SWEET's best trade-off on HumanEval/MBPP is δ = 3 (Table 2)
ENTROPY_THRESHOLD = 1.2  # τ in nats; SWEET tunes τ ∈ [0.3, 1.2] (§4.2); bench/results/trace.md
THRESHOLD = 1e-5  # detection at p (Bonferroni over customers) below this; bench measures its FPR
_INFO = b"codemoat/watermark/v1"


def green_key(secret: bytes) -> bytes:
    """The AES-256 key of a customer's green lists: HKDF-SHA256(watermark secret)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(secret)


class GreenList:
    """G(u) ⊂ V for each previous token u, from AES-256 used as a PRF.

    Block (u, i) = AES(k, u ‖ i) holds eight 16-bit values, one for each token 8i … 8i+7; token v
    is green after u iff its value is below γ·2¹⁶. A whole mask costs |V|/8 AES blocks.
    """

    def __init__(self, secret: bytes, gamma: float = GAMMA, cache: int = 128):
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        self.gamma = gamma
        self._limit = np.uint16(min(round(gamma * 2**16), 2**16 - 1))
        self._aes = Cipher(algorithms.AES(green_key(secret)), modes.ECB()).encryptor()
        self._masks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache = cache

    @property
    def limit(self) -> int:
        """A token is green when its 16-bit value is below this."""
        return int(self._limit)

    def prf(self, blocks: bytes | memoryview) -> bytes:
        """The raw PRF over 16-byte blocks (u ‖ i as two little-endian u64 each): eight little-endian
        16-bit values per block, for engines that build green masks in their own tensor library (vLLM)."""
        return self._aes.update(blocks)

    def _values(self, prev: np.ndarray, block: np.ndarray) -> np.ndarray:
        blocks = np.empty((len(block), 2), dtype="<u8")
        blocks[:, 0], blocks[:, 1] = prev, block
        return np.frombuffer(self._aes.update(blocks.tobytes()), dtype="<u2").reshape(-1, 8)

    def is_green(self, prev: np.ndarray, tok: np.ndarray) -> np.ndarray:
        """Elementwise: is tok[i] in G(prev[i])?"""
        tok = np.asarray(tok, dtype=np.uint64)
        vals = self._values(np.asarray(prev, dtype=np.uint64), tok // 8)
        return vals[np.arange(len(tok)), (tok % 8).astype(np.intp)] < self._limit

    def mask(self, prev: int, vocab_size: int) -> np.ndarray:
        """Boolean mask over the vocabulary of G(prev) (cached, least recently used out)."""
        key = (prev, vocab_size)
        m = self._masks.get(key)
        if m is None:
            n = -(-vocab_size // 8)
            m = self._values(np.full(n, prev, dtype=np.uint64), np.arange(n, dtype=np.uint64)).ravel()[:vocab_size] < self._limit
            self._masks[key] = m
            if len(self._masks) > self._cache:
                self._masks.popitem(last=False)
        else:
            self._masks.move_to_end(key)
        return m


def entropy(logits: np.ndarray) -> float:
    """Shannon entropy (nats) of softmax(logits): log Z - Σ p·x for x = logits - max."""
    x = np.array(logits, dtype=np.float32)  # a copy, shifted in place
    x -= x.max()
    np.maximum(x, np.float32(-1e30), out=x)  # -inf (a banned token) → a finite floor whose e^x is 0
    e = np.exp(x)
    z = float(e.sum())
    return max(0.0, math.log(z) - float(np.dot(e, x)) / z)


def entropies(logits: np.ndarray) -> np.ndarray:
    """Row-wise entropy (nats) of softmax over the last axis of (n, V) logits."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -(np.where(p > 0, p * np.log(p), 0.0)).sum(axis=-1)


class WatermarkProcessor:
    """A `codemoat.engines.base.LogitsProcessor` adding δ to green logits where entropy ≥ τ.

    `key` is the customer's 32-byte watermark secret (the license's `watermark_key`).
    """

    def __init__(
        self,
        key: bytes,
        gamma: float = GAMMA,
        delta: float = DELTA,
        entropy_threshold: float = ENTROPY_THRESHOLD,
        vocab_size: int | None = None,
    ):
        self.green = GreenList(key, gamma)
        self.delta, self.entropy_threshold, self.vocab_size = delta, entropy_threshold, vocab_size
        self._key = key

    def __reduce__(self):
        # rebuilt from its parameters (its AES context cannot be pickled): it crosses to the engine process
        return (type(self), (self._key, self.green.gamma, self.delta, self.entropy_threshold, self.vocab_size))

    def __call__(self, input_ids: Sequence[int], logits: np.ndarray) -> np.ndarray:
        if len(input_ids) == 0 or entropy(logits) < self.entropy_threshold:
            return logits
        n = self.vocab_size or len(logits)
        mask = self.green.mask(int(input_ids[-1]), len(logits))
        if n < len(logits):
            mask = mask & (np.arange(len(logits)) < n)
        # arithmetic, not `out[mask] += δ`: boolean indexing costs ~20× more at a 262k vocabulary
        return logits + mask * logits.dtype.type(self.delta)


def binom_tail(k: int, n: int, p: float) -> float:
    """P(X ≥ k) for X ~ Bin(n, p), summed exactly in log space."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0

    def log_term(i: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)

    if k <= n * p:  # below the mean: the complement is the short sum
        lower = sum(math.exp(log_term(i)) for i in range(0, k))
        return max(0.0, min(1.0, 1.0 - lower))
    first = log_term(k)
    total, i, term = 0.0, k, 1.0
    while i <= n and term > 1e-17:  # terms fall geometrically above the mean
        term = math.exp(log_term(i) - first)
        total += term
        i += 1
    return min(1.0, math.exp(first) * total)


def detect(
    token_ids: Sequence[int],
    key: bytes,
    gamma: float = GAMMA,
    entropies: Sequence[float] | None = None,
    entropy_threshold: float = ENTROPY_THRESHOLD,
    green: GreenList | None = None,
) -> tuple[float, float]:
    """(z, p) of the green-token count in `token_ids` under `key`.

    `entropies[t]` is the model's entropy when token t was chosen (None: score every token).
    """
    n_scored, n_green = count(token_ids, green or GreenList(key, gamma), entropies, entropy_threshold)
    if n_scored == 0:
        return 0.0, 1.0
    z = (n_green - gamma * n_scored) / math.sqrt(n_scored * gamma * (1 - gamma))
    return z, binom_tail(n_green, n_scored, gamma)


def count(
    token_ids: Sequence[int],
    green: GreenList,
    entropies: Sequence[float] | None = None,
    entropy_threshold: float = ENTROPY_THRESHOLD,
) -> tuple[int, int]:
    """(T, |s|_G): unique (prev, token) pairs scored, and how many are green."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if len(ids) < 2:
        return 0, 0
    keep = np.ones(len(ids) - 1, bool)
    if entropies is not None:
        keep = np.asarray(entropies, dtype=np.float64)[1 : len(ids)] >= entropy_threshold
    pairs = np.unique(np.stack([ids[:-1][keep], ids[1:][keep]], axis=1), axis=0)
    if len(pairs) == 0:
        return 0, 0
    return len(pairs), int(green.is_green(pairs[:, 0].astype(np.uint32), pairs[:, 1].astype(np.uint32)).sum())


@dataclass
class WatermarkScore:
    customer: str
    z: float
    p: float
    p_adj: float
    detected: bool
    scored_tokens: int


def detect_ids(
    ids: Sequence[int],
    keys: Mapping[str, bytes],
    entropies: Sequence[float] | None = None,
    gamma: float = GAMMA,
    entropy_threshold: float = ENTROPY_THRESHOLD,
    threshold: float = THRESHOLD,
    greens: Mapping[str, GreenList] | None = None,
) -> list[WatermarkScore]:
    """Score token ids against every customer's key; Bonferroni over customers; best first."""
    out = []
    for name, key in keys.items():
        g = (greens or {}).get(name) or GreenList(key, gamma)
        t, k = count(ids, g, entropies, entropy_threshold)
        z = (k - gamma * t) / math.sqrt(t * gamma * (1 - gamma)) if t else 0.0
        p = binom_tail(k, t, gamma) if t else 1.0
        p_adj = min(1.0, p * len(keys))
        out.append(WatermarkScore(name, z, p, p_adj, p_adj < threshold, t))
    out.sort(key=lambda s: -s.z)
    return out


def detect_text(
    text: str,
    tokenize: Callable[[str], list[int]],
    keys: Mapping[str, bytes],
    entropy_fn: Callable[[list[int]], np.ndarray] | None = None,
    **kw,
) -> list[WatermarkScore]:
    """Tokenise `text` with the model's tokenizer, then `detect_ids` (entropies from `entropy_fn`)."""
    ids = tokenize(text)
    return detect_ids(ids, keys, entropy_fn(ids) if entropy_fn and len(ids) > 1 else None, **kw)


def aggregate(
    runs: Sequence[Sequence[int]],
    keys: Mapping[str, bytes],
    entropies: Sequence[Sequence[float] | None] | None = None,
    gamma: float = GAMMA,
    entropy_threshold: float = ENTROPY_THRESHOLD,
    threshold: float = THRESHOLD,
    greens: Mapping[str, GreenList] | None = None,
) -> list[WatermarkScore]:
    """One verdict per customer over many completions (token id lists), best first.

    Stouffer's method (Stouffer et al. 1949; Whitlock 2005, "Combining probability from independent
    studies") with weights √T_i: Z = Σ √T_i z_i / √(Σ T_i), which for the green-count z-test is the
    z of the pooled counts; p = Φ̄(Z), Bonferroni over customers. A (previous, token) pair already
    scored in an earlier completion is not scored again, so the completions' counts stay independent
    (the repeated-pair rule of `count`, across completions).
    """
    out = []
    for name, key in keys.items():
        g = (greens or {}).get(name) or GreenList(key, gamma)
        seen: set[tuple[int, int]] = set()
        t_all = g_all = 0
        for i, ids in enumerate(runs):
            ids = np.asarray(ids, dtype=np.int64)
            if len(ids) < 2:
                continue
            keep = np.ones(len(ids) - 1, bool)
            ent = entropies[i] if entropies is not None else None
            if ent is not None:
                keep = np.asarray(ent, dtype=np.float64)[1 : len(ids)] >= entropy_threshold
            pairs = {(int(a), int(b)) for a, b in zip(ids[:-1][keep], ids[1:][keep])} - seen
            if not pairs:
                continue
            seen |= pairs
            arr = np.array(sorted(pairs), dtype=np.uint32)
            t_all += len(arr)
            g_all += int(g.is_green(arr[:, 0], arr[:, 1]).sum())
        z = (g_all - gamma * t_all) / math.sqrt(t_all * gamma * (1 - gamma)) if t_all else 0.0
        p = 0.5 * math.erfc(z / math.sqrt(2)) if t_all else 1.0
        p_adj = min(1.0, p * len(keys))
        out.append(WatermarkScore(name, z, p, p_adj, p_adj < threshold, t_all))
    out.sort(key=lambda s: -s.z)
    return out


class LlamaScorer:
    """Tokenizer and per-token entropies from a GGUF model through llama.cpp (the vendor's original).

    Entropies are computed a batch of positions at a time in float32 on every core (logits.py):
    memory is one batch of logits, not n_ctx × |V|."""

    def __init__(self, model_path: str, n_ctx: int = 2048, vocab_only: bool = False):
        from ..engines.llamacpp import load_vocab

        self.stream = None
        if vocab_only:  # the tokenizer alone
            self.llm = load_vocab(str(model_path))
            self.n_ctx = n_ctx
        else:  # n_ctx capped at the model's training context
            from .logits import LogitStream

            self.stream = LogitStream(str(model_path), n_ctx=n_ctx)
            self.llm, self.n_ctx = self.stream.llm, self.stream.n_ctx

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8", "replace"), add_bos=False, special=False)

    def entropies(self, ids: list[int]) -> np.ndarray:
        """H_t of the model's distribution over token t given ids[:t] (H_0 = 0, and 0 at the first
        token of each n_ctx window: no context)."""
        from .logits import entropies

        out = np.zeros(len(ids), np.float32)
        if self.stream is None:
            raise RuntimeError("a vocab-only scorer has no entropies")
        for t, logits in self.stream.blocks(ids):
            h = entropies(logits)  # h[j]: entropy of the token after ids[t + j]
            end = min(len(ids), t + 1 + len(h))
            if (t + len(h)) % self.n_ctx == 0 or end == len(ids):  # the window's last logit predicts past it
                h = h[: end - t - 1]
            out[t + 1 : t + 1 + len(h)] = h
        return out
