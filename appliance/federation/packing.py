"""Several quantised update values per SecAgg+ integer (bit packing that survives the masked modular sum).

SecAgg+ uploads one int64 per coordinate, so with a fixed upload (10x below dense float32) the number of
coordinates a round can move is fixed too. Packing F values into each SecAgg+ coordinate moves F times
as many coordinates for the same upload.

What Flower 1.41's SecAgg+ does to a box's values (read from flwr/client/mod/secure_aggregation/
secaggplus_mod.py, flwr/common/secure_aggregation/quantization.py and the server's unmask stage):

    box     v -> multiply by round(Q / max_weight) / Q (= 1.0 exactly with num_examples 1, max_weight 1)
              -> quantize: ((clip(v, -R, R) + R) * Q / (2R)), stochastic rounding, cast to **int32**
              -> prepend the weight Q, add the private and pairwise masks, mod M (int64 arrays)
    server  sum of the masked vectors mod M, masks removed, mod M
              -> (S * 2R/Q - R - (n - 1) R) * Q / (n Q)          (float64: the mean of the v)

With R = Q/2 the quantiser's scale is exactly 1.0, so an integer-valued v = P - R with 0 <= P <= Q is
mapped to the integer P with no rounding at all (ceil(P) - P = 0: the random draw never moves it). So a
box sends its packed integer P as the float P - R; Flower adds it into the masked modular sum unchanged,
and the server recovers the integer sum S = sum_i P_i = round(mean * n + n R) exactly, because every
quantity stays below 2^48 and float64 is exact to 2^53 (`unpack_mean` checks the result is integral).
The int32 cast bounds P by Q = 2^31 - 2: that, not the 2^63 of int64, is the room a packed integer has.

Layout: each value is quantised by the box to an integer u in [0, 2^q - 2] (2^q - 1 levels on [-r, r],
step 2r / (2^q - 2), so 0 is a level: an unchanged coordinate costs no quantisation noise). Field j of
an integer holds u << (j s) with s = q + h and h = ceil(log2(n_max)) headroom bits: the sum of up to
n_max boxes' fields is < n_max (2^q - 1) <= 2^s, so no field ever carries into the next and the field
sums are read back with shifts and masks. The largest q with (F - 1) s + q <= 31 is used; with the
fleet's 610 boxes (h = 10) that is F = 2 at q = 10. F = 3 would leave 3 bits, too coarse for the norm
bound below, so more than 2 values per integer does not fit Flower's 31-bit input at this cohort size.

Privacy: packing is a transport encoding of the box's clipped update, nothing else. The box's clipped
update x (L2 <= C, clipped by Flower's fixedclipping_mod before this step) is quantised by stochastic
rounding, which can move each coordinate by up to one step. `encode` makes sure the *dequantised*
vector y that enters the sum has ||y|| <= C: it first quantises x scaled to a slightly smaller norm
(sqrt(C^2 - k step^2), k coordinates; the expected growth is k step^2 / 4) and checks; if the check
fails it quantises x scaled to C - sqrt(k) step, for which ||y|| <= C holds always (triangle
inequality). So the sum the server unpacks has the same L2 sensitivity C as before and the central DP
noise (z C on the sum, `flower_app.FleetDP`) and the accounting are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

INPUT_BITS = 31                  # Flower's quantize casts to int32: a packed integer must be < 2^31
INT_RANGE = 2**31 - 2            # SecAgg+ quantization_range Q (even: R = Q/2 is an integer)
INT_OFFSET = INT_RANGE // 2      # SecAgg+ clipping_range R: quantiser scale Q / 2R = 1.0 exactly
MAX_EXACT_BITS = 48              # every sum and mean the server forms stays far below float64's 2^53
MIN_BITS = 6                     # below this the quantisation step eats the clip norm


@dataclass(frozen=True)
class PackSpec:
    fields: int         # F values per SecAgg+ integer
    bits: int           # q: a box's value is an integer in [0, 2^q - 2]
    headroom: int       # h: the field sums of up to 2^h boxes never carry
    max_boxes: int      # n_max: the most boxes whose updates may be summed (the cohort)
    value_range: float  # r: values are quantised on [-r, r] (r = C: a clipped update's coordinates lie in it)

    @property
    def shift(self) -> int:
        return self.bits + self.headroom

    @property
    def top(self) -> int:
        """Largest quantised value (2^q - 2; 2^q - 1 levels, the middle one is 0.0)."""
        return 2**self.bits - 2

    @property
    def step(self) -> float:
        return 2.0 * self.value_range / self.top

    @property
    def max_packed(self) -> int:
        return self.top * sum(1 << (j * self.shift) for j in range(self.fields))

    @property
    def modulus(self) -> int:
        """SecAgg+ modulus_range: a power of two above every sum (packed values and the weight Q)."""
        need = (self.max_boxes + 1) * INT_RANGE + 1
        return 1 << max(need - 1, 1).bit_length()

    def packed_len(self, k: int) -> int:
        return -(-k // self.fields)

    def secagg_ranges(self) -> dict[str, int | float]:
        """SecAggPlusWorkflow arguments under which Flower maps each packed integer 1:1."""
        return {"clipping_range": float(INT_OFFSET), "quantization_range": INT_RANGE, "modulus_range": self.modulus}


def plan(fields: int, max_boxes: int, value_range: float) -> PackSpec:
    """The finest quantisation that packs `fields` values per SecAgg+ integer without any carry between
    fields in the sum of up to `max_boxes` boxes; refuses (ValueError) when none fits."""
    if fields < 1 or max_boxes < 1 or not value_range > 0:
        raise ValueError("packing needs fields >= 1, max_boxes >= 1 and a positive value range")
    h = max(1, math.ceil(math.log2(max_boxes)))
    q = (INPUT_BITS - (fields - 1) * h) // fields
    while q >= MIN_BITS and PackSpec(fields, q, h, max_boxes, value_range).max_packed > INT_RANGE:
        q -= 1
    if q < MIN_BITS:
        raise ValueError(
            f"cannot pack {fields} values per SecAgg+ integer for {max_boxes} boxes: each field needs "
            f"{h} headroom bits (ceil(log2({max_boxes}))) above its quantisation bits and Flower's "
            f"quantiser takes {INPUT_BITS}-bit integers, which leaves {q} bits (< {MIN_BITS}); pack fewer values")
    spec = PackSpec(fields, q, h, max_boxes, value_range)
    if spec.modulus.bit_length() - 1 > MAX_EXACT_BITS or fields * spec.shift > MAX_EXACT_BITS:
        raise ValueError(f"{max_boxes} boxes overflow the {MAX_EXACT_BITS}-bit exact range of the aggregate")
    return spec


def check_norm_room(spec: PackSpec, k: int, clip: float) -> None:
    """The fallback of `encode` needs C - sqrt(k) step > 0."""
    if clip - math.sqrt(spec.packed_len(k) * spec.fields) * spec.step <= 0:
        raise ValueError(f"quantisation step {spec.step:.3g} over {k} values can exceed the clip norm {clip}: "
                         "pack fewer values or send fewer coordinates")


def quantise(x: np.ndarray, spec: PackSpec, rng: np.random.Generator) -> np.ndarray:
    """Unbiased stochastic rounding of x (clipped to [-r, r]) to integers in [0, top]."""
    t = (np.clip(np.asarray(x, dtype=np.float64), -spec.value_range, spec.value_range) + spec.value_range) / spec.step
    lo = np.floor(t)
    u = lo + (rng.random(t.shape) < (t - lo))
    return np.clip(u, 0, spec.top).astype(np.int64)


def dequantise(u: np.ndarray, spec: PackSpec, n_boxes: int = 1) -> np.ndarray:
    """Values of integers (or of the sum of n_boxes boxes' integers) u."""
    return np.asarray(u, dtype=np.float64) * spec.step - n_boxes * spec.value_range


def pack(u: np.ndarray, spec: PackSpec) -> np.ndarray:
    """k integers in [0, top] -> ceil(k / F) packed integers (the last one zero-padded)."""
    u = np.asarray(u, dtype=np.int64)
    if u.size and (u.min() < 0 or u.max() > spec.top):
        raise ValueError(f"quantised values must lie in [0, {spec.top}]")
    n = spec.packed_len(len(u))
    grid = np.zeros(n * spec.fields, dtype=np.int64)
    grid[:len(u)] = u
    grid = grid.reshape(n, spec.fields)
    return sum(grid[:, j] << (j * spec.shift) for j in range(spec.fields)).astype(np.int64)


def unpack(packed_sum: np.ndarray, k: int, spec: PackSpec) -> np.ndarray:
    """Packed integers (one box's, or the sum of up to max_boxes boxes') -> the k per-value (sums of) integers."""
    s = np.asarray(packed_sum, dtype=np.int64)
    mask = (1 << spec.shift) - 1
    fields = np.stack([(s >> (j * spec.shift)) & mask for j in range(spec.fields)], axis=1)
    return fields.reshape(-1)[:k]


def encode(x: np.ndarray, spec: PackSpec, clip: float, rng: np.random.Generator) -> np.ndarray:
    """A box's clipped update x (||x|| <= clip) -> the floats it hands SecAgg+ (packed integer - R), such
    that the dequantised vector entering the sum has L2 norm <= clip (see the module docstring)."""
    x = np.asarray(x, dtype=np.float64)
    norm = float(np.linalg.norm(x))
    if norm > clip * (1 + 1e-9):
        raise ValueError(f"update norm {norm:.6g} above the clip norm {clip}: clip before packing")
    k = spec.packed_len(len(x)) * spec.fields
    check_norm_room(spec, len(x), clip)
    u = None
    for target in (math.sqrt(max(clip**2 - k * spec.step**2, 0.0)), (clip - math.sqrt(k) * spec.step) * (1 - 1e-9)):
        scaled = x * min(1.0, target / norm) if norm > 0 else x
        u = quantise(scaled, spec, rng)
        if float(np.linalg.norm(dequantise(u, spec))) <= clip:
            break
    else:  # unreachable: the second target bounds the norm by the triangle inequality
        raise AssertionError("quantised update above the clip norm")
    return (pack(u, spec) - INT_OFFSET).astype(np.float64)


def unpack_mean(mean: np.ndarray, n_boxes: int, k: int, spec: PackSpec) -> np.ndarray:
    """SecAgg+'s dequantised mean of n_boxes boxes' encoded vectors -> the exact sum of their dequantised
    updates (k floats). Raises when the aggregate is not the integer sum it must be."""
    if not 1 <= n_boxes <= spec.max_boxes:
        raise ValueError(f"{n_boxes} boxes: the packing has headroom for 1..{spec.max_boxes}")
    s_float = np.asarray(mean, dtype=np.float64) * n_boxes + n_boxes * INT_OFFSET
    s = np.rint(s_float)
    if np.abs(s_float - s).max(initial=0.0) > 0.25 or s.min(initial=0) < 0 or s.max(initial=0) > n_boxes * spec.max_packed:
        raise ValueError("the secure aggregate is not a sum of packed integers (settings differ between box and server?)")
    return dequantise(unpack(s.astype(np.int64), k, spec), spec, n_boxes)
