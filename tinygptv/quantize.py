"""Weight-only int8 and int4 quantization of Linear layers for CPU inference.

Decoding one token reads every weight of the language model once, so on a CPU its speed is set by
memory bandwidth (PLATFORM-NOTES: ~31 GB/s here, i.e. ~6 tok/s for Phi-2 in bf16). Storing weights
in 8 or 4 bits cuts the bytes read by 2x or 4x. The matmuls are PyTorch's own CPU kernels, chosen by
measuring each on Phi-2's six projection shapes with 2 threads on this machine (a CPU with AVX-512
VNNI but no AMX and no avx512_bf16; ms per decoder layer, 1 token / 73 tokens)::

    int8, fbgemm dynamic (``quantized::linear_dynamic``, fp32 in)      3.7 /  20   <- int8, fp32 activations
    int8, ``aten._weight_int8pack_mm``, bf16 in                        7.1 / 164   <- int8, bf16 activations
    int8, ``aten._weight_int8pack_mm``, fp32 in                         86 / 6200  (not vectorised)
    int4, ``aten._weight_int4pack_mm_for_cpu``, bf16 in                4.4 / 155   <- int4
    int4, ``aten._weight_int4pack_mm_for_cpu``, fp32 in                180 / 11800 (not vectorised)
    fp32 ``F.linear`` (MKL)                                            12  /  68

and on a 2-core AMD EPYC with AVX2 only (no AVX-512, no VNNI), ``benchmarks/bench_int4_kernels.py``
(16 layers with distinct weights, so from memory; ms per decoder layer, 1 token / 73 tokens)::

    int8, fbgemm dynamic                                               2.7 /  37   <- int8
    int4, ``aten._weight_int4pack_mm_for_cpu``, bf16 in                6.6 / 154   <- int4 (default)
    int4, onnxruntime ``MatMulNBits``, int8 activations per group     2.4 /  72   <- int4 (OrtInt4Matmul)

onnxruntime's kernel is faster but holds more memory; torch's is the default, onnxruntime's is
``TINYGPTV_INT4_KERNEL=onnxruntime`` (:data:`INT4_KERNEL_ENV`). With onnxruntime's kernel, the
layers that read the same input (Phi's q, k, v and fc1) run as one call
(:class:`SharedInputGroup`): each call has a fixed cost in the model, and this takes three of the
six per decoder layer away (Phi-2 decode 7.16 -> 7.80 tok/s, medians of 10 alternating rounds,
``benchmarks/bench_int4_fusion.py``).

fbgemm quantizes the activations too (8 bits; 7 on CPUs without VNNI; each token on its own range,
as :class:`Int8Linear` maps every row onto [-1, 1] first), which is what makes it fast (int8 dot
products) and is the one approximation beyond the weights' rounding: ~1% of a layer's output on
random data, more where a few input channels are much larger than the rest (for weight-only int8
run the model in bf16, which takes the int8pack kernel); torch's int4
kernel only exists vectorised for bf16 activations, so Int4Linear casts to bf16 around it, and
onnxruntime's rounds them to int8 per group of the input (:class:`OrtInt4Matmul`). Everything
outside these matmuls runs in the model's float dtype, so the norms TinyGPT-V adds (QK LayerNorm,
post-attention RMSNorm) are computed exactly as in the float model. torchao 0.18's wrappers of the
same aten kernels were slow in eager mode or wrong under ``torch.compile`` here (PLATFORM-NOTES).

Formats (what :func:`quantize_linear_layers` stores, and what a saved quantized model holds):

* int8: symmetric per output channel, ``w = q * scale`` with ``q`` in [-127, 127].
* int4: asymmetric per group of ``group_size`` input features, ``w = (q - 8) * scale + zero`` with
  ``q`` in [0, 15], two values per byte (even input index in the low nibble). ``scale`` and ``zero``
  are stored as float32 but hold bf16 numbers (what the kernel computes with), fitted by least
  squares (:func:`_int4_scale_zero`). For CPU inference the first decoder layers stay int8
  (:data:`INT4_INT8_SHARE`), as does the LM head.

A kernel's own layout (fbgemm's packed matrix, the int4 kernel's nibble order and bf16 scales) is
derived from these on first use or by :func:`pack_for_cpu`, and then *replaces* the portable buffers
in memory, so a model never holds its weights twice; ``state_dict`` converts back, so saved files
are portable. Off the CPU, and for widths the kernels do not take (int8 bf16: in_features not a
multiple of 16; int4: out_features not a multiple of 16), these modules dequantize and matmul:
correct, not fast.
"""

from __future__ import annotations

import functools
import gc
import math
import os
import re
import warnings
import weakref
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

QUANT_MODES = ("int8", "int4")

INT4_GROUP_SIZE = 64
"""Default int4 group size. Measured on Phi-2's six projection shapes, one token, 2 threads: the
kernel takes as long per decoder layer at 64 as at 128 (4.9 ms) and 9% longer at 32; the rounding's
mean squared error is 0.81x that of 128 at 64 and 0.61x at 32 (Gaussian weights, min / max). With
the first layers int8 (:data:`INT4_INT8_SHARE`), 64 meets the quality gate at a lower peak RSS."""

INT4_REFITS = 3
"""Least-squares refits of each int4 group's scale and zero (:func:`_int4_scale_zero`)."""

INT4_INT8_SHARE = 3 / 16
"""Share of an int4 LM's decoder layers, the first ones, kept int8 for CPU inference (6 of Phi-2's
32). Rounding noise in the first layers moves the output far more than in later ones: at Phi-2 size
with random weights, the same relative noise on all weights of layer 0 moved the last-token logits
(1 - cosine) 5x as much as on layer 5 and ~28x as much as on a layer among 24-31, and layers 0-5
together made 60% of the whole. int8 there costs 34 MB a layer against int4 and runs faster
(fbgemm). ``benchmarks/bench_quantize_quality.py`` measures the result."""


class _WeightOnlyLinear(nn.Module):
    """What the int8 and int4 layers share: reshaping, the fallback matmul, the bias, and holding
    the integer codes either as the portable ``qweight`` buffer or in a kernel's own layout."""

    in_features: int
    out_features: int
    dequantize: "Callable[[], torch.Tensor]"  # each subclass: its float (N, K) weight
    _packed = None  # the CPU kernel's layout of the codes once derived; qweight is then None

    def _cpu_kernel(self, x2: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor | None:
        """(M, K) -> (M, N) on the CPU kernel, or None where the kernel does not apply. ``source``
        is the input before reshaping (a fused layer recognises its shared input by it)."""
        return None

    def _codes_from_packed(self) -> torch.Tensor:
        """The portable ``qweight`` recovered from ``self._packed``."""
        raise NotImplementedError

    def _portable_from_packed(self) -> dict[str, torch.Tensor]:
        """The portable buffers that the kernel's layout replaced, recovered from it."""
        return {"qweight": self._codes_from_packed()}

    def portable(self, name: str) -> torch.Tensor:
        """Portable buffer ``name`` (``qweight``, ``scale``, ...), wherever it lives now."""
        held = self._buffers.get(name)
        return held if held is not None or self._packed is None else self._portable_from_packed()[name]

    def codes(self) -> torch.Tensor:
        """The portable integer codes (what ``qweight`` holds), wherever they live now."""
        return self.portable("qweight")

    def pack(self) -> None:
        """Derive the CPU kernel's layout now rather than on the first call (no-op where it does
        not apply): :func:`pack_for_cpu` does this layer by layer, so the packing's temporaries
        come one layer at a time instead of on top of the whole model at the first forward."""

    def _replace_codes(self, packed, names: tuple[str, ...] = ("qweight",)) -> None:
        """Keep the buffers ``names`` only in the kernel's layout ``packed`` from now on."""
        self._packed = packed
        for name in names:
            self._buffers[name] = None
        _trim_heap()  # the packing's temporaries (see release_freed_memory)

    def _restore_codes(self) -> None:
        """Back to the portable buffers (before a move, a load, or a bf16 call)."""
        if self._packed is not None:
            portable = self._portable_from_packed()
            self._packed = None
            self._buffers.update(portable)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._packed is not None:  # the portable buffers, in their declaration order
            portable = self._portable_from_packed()
            for name, held in self._buffers.items():
                value = destination.pop(prefix + name, None) if held is not None else portable[name]
                if value is not None:
                    destination[prefix + name] = value

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._restore_codes()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._restore_codes()  # a device or dtype move starts from the portable codes
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        out = self._cpu_kernel(x2, x) if x.device.type == "cpu" else None
        if out is None:
            out = F.linear(x2, self.dequantize().to(x.dtype))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)


def _fbgemm_available() -> bool:
    return torch.backends.quantized.engine in ("x86", "fbgemm")


@functools.lru_cache(maxsize=None)
def _needs_reduced_range() -> bool:
    """Whether fbgemm must quantize activations to 7 bits: without VNNI its int8 dot products add
    u8 x s8 pairs in int16 (``vpmaddubsw``), which full-range activations can saturate."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return not ("avx512_vnni" in flags or "avx_vnni" in flags)


INT4_KERNEL_ENV = "TINYGPTV_INT4_KERNEL"
"""Environment variable that picks the int4 CPU kernel: ``torch`` (the default) or ``onnxruntime``
(``pip install 'tinygptv[onnxruntime]'``). Read when a layer is packed, so a benchmark can set it
per process and compare the two. At Phi-2 size on a 2-core AVX2 CPU (``tinygptv bench``), the
onnxruntime kernel decodes 1.4-1.6x as fast and prefills 1.5-2x as fast, but holds ~0.6 GB more
(its packed weights carry fp32 scales and block sums beside the codes): 4.6 GB peak against 3.9.
int4 is the choice for memory, so torch's kernel is the default."""


@functools.lru_cache(maxsize=None)
def _onnxruntime_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def int4_cpu_kernel() -> str:
    """The int4 CPU kernel packing will use now: ``"torch"`` or ``"onnxruntime"`` (see
    :data:`INT4_KERNEL_ENV`)."""
    choice = os.environ.get(INT4_KERNEL_ENV, "torch").strip().lower() or "torch"
    if choice not in ("torch", "onnxruntime"):
        raise ValueError(f"{INT4_KERNEL_ENV}={choice!r}: expected torch or onnxruntime")
    if choice == "onnxruntime" and not _onnxruntime_available():
        raise ImportError(f"{INT4_KERNEL_ENV}=onnxruntime, but onnxruntime / onnx are not installed "
                          "(pip install 'tinygptv[onnxruntime]')")
    return choice


class OrtInt4Matmul:
    """``x @ W.T`` for our int4 format on onnxruntime's ``MatMulNBits`` CPU kernel (MLAS).

    ``MatMulNBits`` without zero points computes ``(q - 8) * scale`` per group, which is our format
    less its float ``zero``; the zero's share, ``sum_g zero[n, g] * sum_{i in g} x[i]``, is a small
    (M, G) x (G, N) matmul in the same graph. ``accuracy_level=4`` makes MLAS round the activations
    to int8 per group of the input (symmetric, per block: finer than fbgemm's per-token rounding)
    and use int8 dot products. Measured at Phi-2's shapes, one token, 2 threads, the six Linear
    layers of a decoder layer, 16 layers with distinct weights (so from memory, not cache): 2.4 ms
    per layer against 6.6 ms for ``aten._weight_int4pack_mm_for_cpu`` and 2.7 ms for fbgemm's
    int8 (``benchmarks/bench_int4_kernels.py``, a 2-core AVX2 AMD EPYC).

    The codes, scales and zeros are handed to onnxruntime as external initializers (no copy), and
    its kernels pre-pack them into their own layout at session creation; onnxruntime then releases
    the originals, which are never read again, so the caller may free them (a test overwrites them
    after packing and checks the results do not change). :meth:`codes` recovers the portable codes
    from the session (for saving after inference) by multiplying identity rows.
    """

    PROFILER_NAME = "onnxruntime::MatMulNBits"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, threads: int | None = None):
        import onnxruntime as ort
        from onnx import TensorProto, helper

        n, k = codes.shape[0], codes.shape[1] * 2
        groups = k // group_size
        self.in_features, self.out_features, self.group_size = k, n, group_size
        arrays = {
            "B": codes.detach().contiguous().numpy().reshape(n, groups, group_size // 2),
            "S": scale.detach().float().contiguous().numpy().reshape(-1),
            "Zt": zero.detach().float().t().contiguous().numpy(),  # (G, N)
        }

        def external(name, array, dtype):
            tensor = TensorProto(name=name, data_type=dtype, dims=array.shape)
            tensor.data_location = TensorProto.EXTERNAL
            tensor.external_data.add(key="location", value="tinygptv-in-memory")
            return tensor

        nodes = [
            helper.make_node("MatMulNBits", ["A", "B", "S"], ["Yq"], domain="com.microsoft",
                             K=k, N=n, bits=4, block_size=group_size, accuracy_level=4),
            helper.make_node("Reshape", ["A", "group_shape"], ["Ag"]),
            helper.make_node("ReduceSum", ["Ag", "last_axis"], ["Asum"], keepdims=0),
            helper.make_node("MatMul", ["Asum", "Zt"], ["Yz"]),
            helper.make_node("Add", ["Yq", "Yz"], ["Y"]),
        ]
        initializers = [
            external("B", arrays["B"], TensorProto.UINT8),
            external("S", arrays["S"], TensorProto.FLOAT),
            external("Zt", arrays["Zt"], TensorProto.FLOAT),
            helper.make_tensor("group_shape", TensorProto.INT64, [3], [0, groups, group_size]),
            helper.make_tensor("last_axis", TensorProto.INT64, [1], [2]),
        ]
        graph = helper.make_graph(
            nodes, "int4_linear", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], initializer=initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Spinning workers would take the cores from PyTorch's ops between two matmuls (measured:
        # 40x slower with ~100 spinning sessions).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # No per-session arena: each would keep its largest activations (a prefill's) for good,
        # times every layer of the model.
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        values = [ort.OrtValue.ortvalue_from_numpy(arrays[name]) for name in ("B", "S", "Zt")]
        options.add_external_initializers(["B", "S", "Zt"], values)
        self._session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    @staticmethod
    def takes(group_size: int) -> bool:
        """Whether ``MatMulNBits`` takes this group size (a power of two, at least 16)."""
        return group_size >= 16 and group_size & (group_size - 1) == 0

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, K) -> (M, N), in ``x2``'s dtype (computed from float32)."""
        a = x2.detach().to(torch.float32).contiguous().numpy()
        with torch.profiler.record_function(self.PROFILER_NAME):  # so that profiles show the matmul
            out = torch.from_numpy(self._session.run(None, {"A": a})[0])
        return out.to(x2.dtype)

    @torch.no_grad()
    def codes(self, scale: torch.Tensor, zero: torch.Tensor, rows: int = 512) -> torch.Tensor:
        """The portable (N, K/2) uint8 codes, read back through the kernel: identity rows give
        ``(q - 8) * scale + zero`` column by column, from which ``q`` is rounded (the int8 rounding
        of a one-hot row is exact, so the error is float rounding, far below half a step)."""
        n, k, g = self.out_features, self.in_features, self.group_size
        scale, zero = scale.float(), zero.float()
        codes = torch.empty(n, k, dtype=torch.int32)
        for start in range(0, k, rows):
            cols = torch.arange(start, min(start + rows, k))
            eye = torch.zeros(len(cols), k)
            eye[torch.arange(len(cols)), cols] = 1.0
            w = self(eye).t()  # (N, c): the dequantized weights of these input columns
            s, z = scale[:, cols // g], zero[:, cols // g]
            q = torch.round((w - z) / s) + 8
            if not (q.min() >= 0 and q.max() <= 15 and ((w - z) / s + 8 - q).abs().max() < 0.25):
                raise RuntimeError("could not read the int4 codes back from onnxruntime's packed weights")
            codes[:, cols] = q.to(torch.int32)
        return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)

    def __deepcopy__(self, memo):
        raise TypeError("an onnxruntime-packed int4 layer cannot be copied; copy the model before packing it")


class Int8Linear(_WeightOnlyLinear):
    """A Linear layer with int8 weights (per-output-channel scales) and float activations."""

    bits = 8

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device)
        for rows in _row_chunks(linear.out_features):
            w = linear.weight[rows].detach().float()
            scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (n,)
            module.qweight[rows] = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            module.scale[rows] = scale
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def dequantize(self) -> torch.Tensor:
        return self.codes().float() * self.scale[:, None]

    def _codes_from_packed(self) -> torch.Tensor:
        weight, _ = torch.ops.quantized.linear_unpack(self._packed)  # exact: the same codes and scales
        return weight.int_repr()

    def weight_nbytes(self) -> int:
        """Bytes of weights read per forward: the codes and the scales (not the bias)."""
        return self.out_features * (self.in_features + self.scale.element_size())

    _row_sums = None  # (N,) sum over k of the dequantized weight, with the packed layout

    def pack(self) -> None:
        """fbgemm's packed matrix (what float32 activations run on); it holds codes and scales."""
        if self._packed is not None or not _fbgemm_available():
            return
        # exact integer sums, one rounding: what _fbgemm needs to undo its shift of the input rows
        # (in row pieces, so the int32 temporary stays small beside the packing's own)
        sums = [self.qweight[rows].sum(dim=1, dtype=torch.int32) for rows in _row_chunks(self.out_features)]
        self._row_sums = torch.cat(sums).float() * self.scale
        zeros = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors are deprecated, fbgemm's packing still takes one
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            weight = torch._make_per_channel_quantized_tensor(self.qweight, self.scale.double(), zeros, 0)
        self._replace_codes(torch.ops.quantized.linear_prepack(weight, None))

    def _cpu_kernel(self, x2: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor | None:
        if x2.dtype == torch.float32 and _fbgemm_available():
            self.pack()
            return self._fbgemm(x2)
        # bf16: the int8pack kernel needs in_features % 16 == 0 (other widths crash, seen with torch 2.13)
        if x2.dtype != torch.bfloat16 or self.in_features % 16:
            return None
        self._restore_codes()
        return torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scale.to(x2.dtype))

    def _fbgemm(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 @ W.T on fbgemm, each row of x2 rounded to 8 bits (7 without VNNI) on its own range.

        fbgemm picks one scale and zero point from the min and max of the whole (M, K) input, so a
        row far smaller than the largest (a text token beside image tokens, one sequence of a batch)
        would keep only a few levels, and a row's result would depend on the others in the call.
        Each row is first mapped onto exactly [-1, 1], ``x = c + h * u``, and the output put back,
        ``x @ W.T = h * (u @ W.T) + c * W.sum(1)`` (the layer is linear; the bias comes after):
        every row then gets the rounding it would get alone, on its own min and max. One row
        (decoding one sequence) is left to fbgemm, whose range is then the row's own: the mapping's
        ten small ops took ~80 us a call here (2 threads, a loaded machine), against ~0.6 ms for
        one of Phi-2's projections at one token."""
        if x2.shape[0] == 1:
            return torch.ops.quantized.linear_dynamic(x2, self._packed, _needs_reduced_range())
        high, top = x2.max(dim=1, keepdim=True)
        low, bottom = x2.min(dim=1, keepdim=True)
        centre = (high + low) / 2
        half = ((high - low) / 2).clamp_(min=torch.finfo(x2.dtype).tiny)
        unit = ((x2 - centre) / half).clamp_(-1.0, 1.0)
        unit.scatter_(1, top, 1.0).scatter_(1, bottom, -1.0)  # the ends exactly: the same range for every row
        out = torch.ops.quantized.linear_dynamic(unit, self._packed, _needs_reduced_range())
        return out.mul_(half).addcmul_(centre, self._row_sums)

    def _restore_codes(self) -> None:
        super()._restore_codes()
        self._row_sums = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=8"


class Int4Linear(_WeightOnlyLinear):
    """A Linear layer with group-wise int4 weights and float activations."""

    bits = 4

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, group_size: int = INT4_GROUP_SIZE, device=None
    ):
        super().__init__()
        if in_features % group_size or group_size % 2:
            raise ValueError(f"in_features {in_features} is not a multiple of the int4 group size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.empty(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("zero", torch.empty(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)
        self._scales_zeros: torch.Tensor | None = None  # (G, N, 2) bf16, what the kernel takes
        self._scale_dtype: torch.dtype | None = None  # set while scale and zero live only in _scales_zeros

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> "Int4Linear":
        n, k = linear.out_features, linear.in_features
        module = cls(k, n, linear.bias is not None, group_size, device=linear.weight.device)
        if linear.weight.is_meta:  # a skeleton for loading saved codes: nothing to round
            return module
        for rows in _row_chunks(n, max(1, 2**22 // k)):  # ~16 MB float temporaries at a time
            w = linear.weight[rows].detach().float().view(-1, k // group_size, group_size)  # (n, G, g)
            scale, zero = _int4_scale_zero(w)
            q = _int4_codes(w, scale, zero).to(torch.uint8).view(-1, k)
            module.qweight[rows] = q[:, 0::2] | (q[:, 1::2] << 4)
            module.scale[rows] = scale
            module.zero[rows] = zero
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def unpack(self) -> torch.Tensor:
        """(N, K) int32 codes in [0, 15]."""
        return _nibbles(self.codes()).view(self.out_features, self.in_features)

    def dequantize(self) -> torch.Tensor:
        q = self.unpack().float().view(self.out_features, -1, self.group_size)
        scale, zero = self.portable("scale").float(), self.portable("zero").float()
        return ((q - 8) * scale[..., None] + zero[..., None]).view(self.out_features, self.in_features)

    def weight_nbytes(self) -> int:
        """Bytes of weights read per forward: the codes, and the scales and zeros as the kernel holds
        them (bf16 for torch's kernel; fp32 for onnxruntime's, which keeps them so)."""
        packed = self._packed.group.fused._packed if isinstance(self._packed, _FusedSlice) else self._packed
        per_group = 8 if isinstance(packed, OrtInt4Matmul) else 4
        return self.out_features * self.in_features // 2 + self.out_features * (self.in_features // self.group_size) * per_group

    def _scale_zero_now(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, G) scale and zero, wherever they live now."""
        if self._scale_dtype is not None:
            scale, zero = self._scales_zeros.transpose(0, 1).to(self._scale_dtype).unbind(-1)
            return scale, zero
        return self.scale, self.zero

    def _codes_from_packed(self) -> torch.Tensor:
        if isinstance(self._packed, _FusedSlice):
            return self._packed.portable()["qweight"]
        if isinstance(self._packed, OrtInt4Matmul):
            return self._packed.codes(*self._scale_zero_now())
        return _int4_codes_from_cpu_layout(self._packed, self.out_features, self.in_features)

    def _portable_from_packed(self) -> dict[str, torch.Tensor]:
        if isinstance(self._packed, _FusedSlice):
            return self._packed.portable()
        portable = super()._portable_from_packed()
        if self._scale_dtype is not None:  # exact: the values were bf16 numbers (see pack)
            scale, zero = self._scale_zero_now()  # (N, G) each
            portable.update(scale=scale.contiguous(), zero=zero.contiguous())
        return portable

    def pack(self) -> None:
        """The CPU kernel's layout (:func:`int4_cpu_kernel` picks the kernel): onnxruntime's
        pre-packed ``MatMulNBits`` weights (:class:`OrtInt4Matmul`), or torch's int4 nibble layout.
        Either keeps (G, N, 2) bf16 scales and zeros beside it (what torch's kernel takes; what
        reading onnxruntime's codes back needs). These replace ``qweight``, and ``scale`` / ``zero``
        too where those hold bf16 numbers (as :meth:`from_linear` makes them; a file from before may
        not), so that nothing is held twice."""
        if self._packed is not None:
            return
        kernel = int4_cpu_kernel()
        if kernel == "onnxruntime" and not OrtInt4Matmul.takes(self.group_size):
            kernel = "torch"
        if kernel == "torch" and self.out_features % 16:  # torch's packing needs N % 16 == 0
            return
        pairs = torch.stack([self.scale, self.zero], dim=-1)  # (N, G, 2)
        self._scales_zeros = pairs.transpose(0, 1).to(torch.bfloat16).contiguous()
        exact = torch.equal(self._scales_zeros.transpose(0, 1).to(pairs.dtype), pairs)
        self._scale_dtype = pairs.dtype if exact else None
        del pairs
        if kernel == "onnxruntime":
            packed = OrtInt4Matmul(self.qweight, self.scale, self.zero, self.group_size)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.unpack(), 1)
        self._replace_codes(packed, ("qweight", "scale", "zero") if exact else ("qweight",))

    def _restore_codes(self) -> None:
        if isinstance(self._packed, _FusedSlice):
            self._packed.group.unfuse()  # every member back to its own portable buffers
            return
        super()._restore_codes()
        self._scales_zeros, self._scale_dtype = None, None

    def _cpu_kernel(self, x2: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor | None:
        if isinstance(self._packed, _FusedSlice):
            return self._packed.group.run(self._packed.index, x2, source)
        self.pack()
        if self._packed is None:
            return None
        if isinstance(self._packed, OrtInt4Matmul):
            return self._packed(x2)
        # only the bf16 variant of this kernel is vectorised (fp32 measured 40x slower): cast around it
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self._packed, self.group_size, self._scales_zeros)
        return out.to(x2.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=4, group_size={self.group_size}"


class _FusedSlice:
    """Where a member of a :class:`SharedInputGroup` keeps its weights: rows of the group's layer."""

    def __init__(self, group: "SharedInputGroup", index: int):
        self.group, self.index = group, index

    def portable(self) -> dict[str, torch.Tensor]:
        """This member's portable qweight, scale and zero, read from the fused layer."""
        start, stop = self.group.bounds[self.index]
        fused = self.group.fused
        return {name: fused.portable(name)[start:stop].contiguous() for name in ("qweight", "scale", "zero")}


class SharedInputGroup:
    """int4 layers that always read the same input tensor (Phi's q, k, v and fc1, which all take
    the input LayerNorm's output) run as one kernel call over their stacked weights.

    Each call into onnxruntime costs a hand-over between PyTorch's and onnxruntime's threads on top
    of the kernel (measured in a Phi-2 decode step: ~730 us per call against ~410 us for the kernel
    alone); one call instead of four per decoder layer saves three of them. The first member
    called with an input computes every member's output and keeps it until each member has taken
    its columns; a member recognises the shared input by identity (the same live tensor object),
    so a new input always recomputes. The members' weights live only in the fused layer
    (:class:`_FusedSlice`); their state dict reads them back, and a device move or load unfuses
    the group first."""

    def __init__(self, members: list["Int4Linear"]):
        first = members[0]
        if any(m.in_features != first.in_features or m.group_size != first.group_size for m in members):
            raise ValueError("layers fused on a shared input need the same in_features and group size")
        self.members = list(members)
        self.bounds, start = [], 0
        for m in members:
            self.bounds.append((start, start + m.out_features))
            start += m.out_features
        fused = Int4Linear(first.in_features, start, bias=False, group_size=first.group_size)
        for name in ("qweight", "scale", "zero"):
            fused._buffers[name] = torch.cat([m.portable(name) for m in members])
        fused.pack()
        self.fused = fused
        self._cache: tuple | None = None  # (weakref to the input, output, members served)
        for index, m in enumerate(members):
            m._packed = _FusedSlice(self, index)
            m._scales_zeros, m._scale_dtype = None, None
            for name in ("qweight", "scale", "zero"):
                m._buffers[name] = None
        _trim_heap()

    def run(self, index: int, x2: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
        """Member ``index``'s (M, N_i) output for the input ``x2`` (reshaped from ``source``)."""
        key = source if source is not None else x2
        cache = self._cache
        if cache is None or cache[0]() is not key or index in cache[2]:
            out = self.fused._cpu_kernel(x2)
            if out is None:
                out = F.linear(x2, self.fused.dequantize().to(x2.dtype))
            cache = self._cache = (weakref.ref(key), out, set())
        cache[2].add(index)
        if len(cache[2]) == len(self.members):
            self._cache = None  # every member has its columns: hold nothing between steps
        start, stop = self.bounds[index]
        return cache[1][:, start:stop]

    def unfuse(self) -> None:
        """Give every member its own portable buffers back (before a move or a load)."""
        self._cache = None
        for m in self.members:
            if isinstance(m._packed, _FusedSlice) and m._packed.group is self:
                portable = m._packed.portable()
                m._packed = None
                m._buffers.update(portable)
        self.fused = None


def fuse_shared_inputs(root: nn.Module) -> int:
    """Fuse the int4 layers that share an input (:class:`SharedInputGroup`) wherever a module names
    such groups in ``SHARED_INPUT_LINEARS`` (our Phi and Llama decoder layers) and every member is
    an unfused int4 layer of one width and group size. Only for onnxruntime's kernel, where it
    pays (each call has a fixed cost); returns the number of groups made."""
    if int4_cpu_kernel() != "onnxruntime":
        return 0
    made = 0
    for module in list(root.modules()):
        for names in getattr(module, "SHARED_INPUT_LINEARS", ()):
            try:
                members = [module.get_submodule(n) for n in names]
            except AttributeError:
                continue
            ok = all(isinstance(m, Int4Linear) and not isinstance(m._packed, _FusedSlice) for m in members)
            if ok and all(m.in_features == members[0].in_features and m.group_size == members[0].group_size
                          and m.qweight is not None and m.qweight.device.type == "cpu" and OrtInt4Matmul.takes(m.group_size)
                          for m in members):  # fmt: skip
                SharedInputGroup(members)
                made += 1
    return made


@functools.lru_cache(maxsize=None)
def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS.

    Replaced float weights linger in reference cycles (PLATFORM-NOTES), hence the collection; and
    glibc keeps freed blocks below its (self-raising, up to 32 MB) mmap threshold in the heap, so
    quantizing layer after layer fragments it: measured at Phi-2 size, 5.75 GB resident after an
    int4 build against 3.6 GB once that memory is returned. ``malloc_trim`` returns it (glibc only;
    elsewhere this only collects).
    """
    gc.collect()
    _trim_heap()


def _trim_heap() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _row_chunks(n: int, rows: int = 4096) -> list[slice]:
    """Row ranges for quantizing a weight in pieces, so that the float temporaries stay small (an
    LM head is 51200 x 2560: 0.5 GB per fp32 temporary if done at once)."""
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]


def _bf16_values(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to the nearest bf16 numbers, kept in its dtype."""
    return t.to(torch.bfloat16).to(t.dtype)


def _int4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(..., G, g) float weights -> the nearest codes in [0, 15] of ``w = (q - 8) * scale + zero``."""
    return torch.round((w - zero[..., None]) / scale[..., None]).add_(8).clamp_(0, 15)


def _int4_scale_zero(w: torch.Tensor, refits: int = INT4_REFITS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale and zero point for (..., G, g) float weights: bf16 numbers (what the kernel
    multiplies by, so the codes are rounded against the values actually used) with a small squared
    error.

    Start from the group's min / max, then ``refits`` times: round to codes, and re-solve scale and
    zero as the least-squares line through (code, weight) (closed form, then rounded to bf16),
    which moves the end points inwards where that lowers the error of the many values in between.
    Measured on Gaussian weights, group 64: mean squared error 0.90x min / max's with 3 refits
    (0.88x with 5); searching a 13 x 13 grid of clipped ranges first reached 0.82x at 25x the time
    (minutes at Phi-2 size), so it is not done. HQQ (``hqq`` 0.2.8, ``Quantizer.quantize(...,
    optimize=True)`` on the CPU) reached 0.92x on the same weights: it minimises an l_p norm with
    p < 1, aimed at outlier weights, not the squared error, and it is not a dependency of this package.
    """
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (..., G)
    scale = _bf16_values(((hi - lo) / 15).clamp(min=1e-12))
    zero = _bf16_values(lo + 8 * scale)
    n, w_sum = w.shape[-1], w.sum(dim=-1)
    for _ in range(refits):
        x = _int4_codes(w, scale, zero).sub_(8)  # (..., G, g)
        x_sum, xx, xw = x.sum(dim=-1), x.square().sum(dim=-1), (x * w).sum(dim=-1)
        det = n * xx - x_sum.square()
        new_scale = (n * xw - x_sum * w_sum) / torch.where(det > 0, det, 1.0)
        ok = (det > 0) & (new_scale > 0)  # a group whose codes are all equal keeps its min / max fit
        scale = torch.where(ok, _bf16_values(new_scale.clamp(min=1e-12)), scale)
        zero = torch.where(ok, _bf16_values((w_sum - scale * x_sum) / n), zero)
    return scale, zero


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., B) uint8 -> (..., 2B) int32: the low nibble of each byte, then the high one."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2).to(torch.int32)


@torch.no_grad()
def _int4_codes_from_cpu_layout(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Invert ``aten._convert_weight_to_int4pack_for_cpu``: the portable (N, K/2) uint8 codes.

    The kernel's layout is a permutation of nibbles that depends on the CPU (64-row blocks with
    AVX-512, 32 with AVX2), so rather than hard-coding it we let the packing op place probes: probe
    ``j`` holds hex digit ``j`` of each nibble's source index, so the packed probes spell out, for
    every packed nibble, where it came from. Only runs when saving a model after CPU inference.
    """
    total = n * k
    source = torch.zeros(total, dtype=torch.int64)
    index = torch.arange(total, dtype=torch.int64)
    for digit in range(max(1, math.ceil(math.log(total, 16)))):
        probe = ((index >> (4 * digit)) & 0xF).to(torch.int32).view(n, k)
        placed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
        source |= _nibbles(placed.flatten()).to(torch.int64) << (4 * digit)
    codes = torch.empty(total, dtype=torch.int32)
    codes[source] = _nibbles(packed.flatten())
    codes = codes.view(n, k)
    portable = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    if not torch.equal(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), packed):
        raise RuntimeError("could not invert the int4 CPU kernel's weight layout (a torch change?)")
    return portable


def int4_group_size(in_features: int, preferred: int = INT4_GROUP_SIZE) -> int:
    """The largest group size <= ``preferred`` among 128, 64, 32 that divides ``in_features``."""
    for g in (128, 64, 32):
        if g <= preferred and in_features % g == 0:
            return g
    raise ValueError(f"no int4 group size (128, 64, 32) divides in_features={in_features}")


def language_model_linear_names(lm: nn.Module, include_lm_head: bool = True) -> list[str]:
    """Names of the Linear layers of a transformers causal LM that weight-only quantization covers:
    every decoder-layer projection, and the LM head if asked."""
    names = [n for n, m in lm.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}"]
    if include_lm_head and isinstance(getattr(lm, "lm_head", None), nn.Linear):
        names.append("lm_head")
    return names


def int8_linear_names(names: Iterable[str], leading_share: float = 0.0) -> list[str]:
    """Which of the LM's Linear layers ``names`` stay int8 in int4 mode: the LM head, and every
    projection of the first ``ceil(leading_share * decoder layers)`` decoder layers
    (see :data:`INT4_INT8_SHARE`)."""
    names = list(names)
    index = {n: int(m.group(1)) for n in names if (m := re.search(r"(?:^|\.)layers\.(\d+)\.", n))}
    leading = math.ceil(leading_share * (max(index.values()) + 1)) if index else 0
    return [n for n in names if n == "lm_head" or index.get(n, leading) < leading]


@torch.no_grad()
def quantize_linear_layers(
    root: nn.Module,
    names: Iterable[str],
    mode: str,
    group_size: int = INT4_GROUP_SIZE,
    int8_names: Iterable[str] = ("lm_head",),
) -> nn.Module:
    """Replace the Linear layers ``names`` of ``root`` in place, one at a time.

    ``mode`` is ``"int8"`` or ``"int4"``; ``int8_names`` are int8 in either mode: the LM head by
    default, since 4 bits on the output projection costs far more accuracy than anywhere else.
    Garbage is collected after each layer (:func:`release_freed_memory`): the replaced float
    weights linger in reference cycles otherwise, doubling the peak (PLATFORM-NOTES).
    """
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    int8 = set(int8_names)

    def make(name: str, linear: nn.Linear) -> nn.Module:
        if mode == "int8" or name in int8:
            return Int8Linear.from_linear(linear)
        return Int4Linear.from_linear(linear, int4_group_size(linear.in_features, group_size))

    return replace_linear_layers(root, names, make)


def replace_linear_layers(root: nn.Module, names: Iterable[str], make: Callable[[str, nn.Linear], nn.Module]) -> nn.Module:
    """Replace each Linear layer ``names`` of ``root`` by ``make(name, linear)``, one at a time,
    collecting garbage (:func:`release_freed_memory`) after each decoder layer's Linear layers, so
    that the float weights go as their replacements come: memory never holds more than the model
    plus one float decoder layer. (A collection per Linear layer cost 0.18 s each at Phi-2 size,
    23 s per load; per decoder layer it is a quarter of that.)"""
    done_group = None
    for name in list(names):
        group = _decoder_layer_of(name)
        if done_group is not None and group != done_group:
            release_freed_memory()
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear (is LoRA still unmerged?)")
        setattr(parent, child, make(name, linear))
        del linear
        done_group = group
    release_freed_memory()
    return root


def _decoder_layer_of(name: str) -> str:
    """``model.layers.3`` for ``model.layers.3.mlp.fc1``; the name itself outside the decoder layers."""
    match = re.match(r"(.*\.layers\.\d+)\.", name)
    return match.group(1) if match else name


def quantize_language_model(
    model, mode: str, group_size: int = INT4_GROUP_SIZE, include_lm_head: bool = True, int8_share: float = 0.0
):
    """Quantize the language model of a :class:`~tinygptv.TinyGPTV` in place for inference.

    ``int8_share``: in int4 mode, keep this share of the decoder layers, the first ones, int8
    (:data:`INT4_INT8_SHARE`); the saved config records it, so a saved model loads with the same
    layout. LoRA must be merged first (a LoRA layer wraps
    its Linear, which this would otherwise skip).
    """
    if any(".lora_" in n for n, _ in model.named_parameters()):
        raise ValueError("merge LoRA into the base weights (model.merge_lora()) before quantizing")
    lm = model.lm
    names = language_model_linear_names(lm, include_lm_head)
    quantize_linear_layers(lm, names, mode, group_size, int8_linear_names(names, int8_share))
    q = model.config.quantization
    q.language_model, q.group_size, q.lm_head = mode, group_size, include_lm_head  # saved with the model
    q.int8_share = int8_share if mode == "int4" else 0.0
    return model


def pack_for_cpu(root: nn.Module) -> None:
    """Put every weight-only layer under ``root`` into its CPU kernel's layout now, one layer at a
    time (see :meth:`_WeightOnlyLinear.pack`), for float32 inference on this machine; with
    onnxruntime's int4 kernel, layers that share an input are fused first (:func:`fuse_shared_inputs`)."""
    fuse_shared_inputs(root)
    for module in root.modules():
        if isinstance(module, _WeightOnlyLinear):
            module.pack()
    release_freed_memory()


class Bf16Embedding(nn.Module):
    """A token embedding table held in bf16 that returns ``dtype`` vectors: half the memory of a
    float32 table (Phi-2's: 0.52 GB -> 0.26 GB). Only the looked-up rows are converted, and rounding
    the table to bf16 changes nothing the bf16 model would not (its table is bf16 too). The table is
    a buffer, not a parameter, so transformers' ``model.dtype`` (its first parameter's) stays the
    model's float dtype."""

    def __init__(self, embedding: nn.Embedding, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.register_buffer("weight", embedding.weight.detach().to(torch.bfloat16))
        self.out_dtype = dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight, self.padding_idx).to(self.out_dtype)  # (..., C)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bf16 -> {self.out_dtype}"


def store_token_embedding_in_bf16(lm: nn.Module) -> None:
    """Replace a float32 LM's input embedding by a :class:`Bf16Embedding` of it (for inference)."""
    embedding = lm.get_input_embeddings()
    if isinstance(embedding, nn.Embedding) and embedding.weight.dtype == torch.float32:
        lm.set_input_embeddings(Bf16Embedding(embedding, embedding.weight.dtype))
        del embedding
        release_freed_memory()


def quantize_dynamic_linears(module: nn.Module) -> None:
    """int8 dynamic quantization (fbgemm: int8 weights, activations quantized per batch) of the
    ``nn.Linear`` layers inside ``module``, in place.

    ``torch.ao.quantization.quantize_dynamic`` is deprecated in torch 2.x but still the one stock CPU
    path for int8 activations x int8 weights (VNNI), which is what pays for compute-bound parts.
    """
    with warnings.catch_warnings():
        for message in (".*torch.ao.quantization.*", ".*quantized tensor creation functions.*"):
            warnings.filterwarnings("ignore", message=message)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8, inplace=True)


VISION_INT8_MIN_WIDTH = 256
"""Narrowest vision encoder / Q-Former for which :func:`quantize_vision_dynamic` quantizes it. A ViT
block's MLP on 8 images of 197 tokens, 2 threads, the 2-core AVX2 machine, int8 dynamic against
fp32: 0.75x as fast at width 128, 1.53x at 256, 1.71x at 512, 1.92x at 1408 (EVA-ViT-g). Below
it int8 only costs accuracy: on the built-in model (width 128 / 160) it changed 12 % of the
``[refer]`` answers of an int8 language model."""


def quantize_vision_dynamic(model, min_width: int = VISION_INT8_MIN_WIDTH) -> None:
    """int8 dynamic quantization of the vision encoder's and Q-Former's Linear layers, for CPU
    inference, each where it pays (:data:`VISION_INT8_MIN_WIDTH`; ``min_width=0``: always).

    The ViT is compute-bound (about 0.5 TFLOP per 224 px image), so on a CPU without bf16 matrix
    units int8 pays there: measured 2-3x faster than fp32 for its 257 x 1408 x 6144 matmuls on this
    machine. Applied at load time from float weights (its packed format is not a safetensors
    tensor), one block at a time.
    """
    parts = ((model.vision, model.config.vision.hidden_size), (model.qformer, model.config.qformer.hidden_size))
    for part, width in parts:
        if width < min_width:
            continue
        for blocks in [m for m in part.modules() if isinstance(m, nn.ModuleList)]:
            for block in blocks:
                quantize_dynamic_linears(block)
                release_freed_memory()
        quantize_dynamic_linears(part)  # what is outside the blocks
        release_freed_memory()
