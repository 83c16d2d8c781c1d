"""How much each sub-layer's quantization changes the model's output: Omega_i(n) (eq. 7).

The lossless 4-bit paper (section 5) measures, for every quantizable sub-layer ``i`` and width
``n``, the KL divergence between the output distribution of the full-precision model and that of
the model where *only* sub-layer ``i`` is quantized to ``n`` bits, averaged over frames of held-out
data. Those numbers are the costs of the bit allocation (:mod:`.allocation`).

Which distribution:

* encoder sub-layers: the softmax-normalised encoder output per frame (the paper's choice,
  ``target="encoder"``), or the CTC posteriors per frame (``target="ctc"``: the distribution the
  model actually decodes with, over the vocabulary);
* decoder sub-layers: they do not change the encoder output, so their KL is taken on the
  attention decoder's token posteriors, teacher-forced on the reference transcripts, per token.

Both are nats per position; summing them in one allocation treats a frame and a token as equally
important (the paper's table quantizes both with one budget). The weights are quantized exactly as
QAT will (:class:`~espnet_compress.quant.quantizers.MaxScaleQuantizer`, per tensor or per channel),
so the measurement describes the grid the allocation will train on.

Measuring costs one encoder pass per (encoder sub-layer, width) and one decoder pass per (decoder
sub-layer, width) over the held-out batches (the fp encoder output is computed once for the
decoder layers). A table is cached with a fingerprint of the model's weights and the measurement
options, so a cache from another model (or other data, widths, target) is refused, never reused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from espnet_compress.mixed_precision.allocation import AllocationError, Problem
from espnet_compress.quant.modules import layer_kind
from espnet_compress.quant.quantizers import MaxScaleQuantizer, check_bits
from espnet_compress.utils.io import atomic_write_bytes

#: the widths the paper searches over (Table 2); 0 (full precision) may be added
DEFAULT_WIDTHS: Tuple[int, ...] = (1, 2, 3, 4, 6, 8)
#: where an encoder sub-layer's KL is measured (decoder sub-layers always use the decoder)
TARGETS: Tuple[str, ...] = ("encoder", "ctc")
#: layer kinds measured: the ones every QAT config quantizes
MEASURED_KINDS: Tuple[str, ...] = ("linear", "conv1d")
#: bump when the cache layout changes
CACHE_VERSION = 1

Batch = Dict[str, torch.Tensor]
PathLike = Union[str, Path]


class SensitivityError(ValueError):
    """A measurement that cannot be made or a cache that does not belong to this model."""


@dataclasses.dataclass(frozen=True)
class SensitivityTable:
    """``Omega_i(n)`` for every measured sub-layer, with what it was measured on.

    Attributes:
        names: full module names in the ASR model (``encoder.encoders.0.feed_forward.w_1``).
        params: weights per sub-layer (``N_i`` of eq. 8).
        widths: the measured widths, the columns of ``omega`` (0 = full precision).
        omega: ``(len(names), len(widths))`` mean KL in nats per frame (encoder) or token (decoder).
        fingerprint: of the model weights and the measurement options (see :func:`fingerprint`).
        target: ``encoder`` or ``ctc`` (the encoder sub-layers' distribution).
        num_utts: held-out utterances measured on.
    """

    names: Tuple[str, ...]
    params: Tuple[int, ...]
    widths: Tuple[int, ...]
    omega: np.ndarray
    fingerprint: str
    target: str
    num_utts: int

    def problem(self) -> Problem:
        """The allocation problem (eq. 8) over these sub-layers and widths."""
        return Problem(self.names, self.params, self.widths, self.omega)

    def save(self, path: PathLike) -> None:
        """Write the table atomically (``.npz``: arrays plus a JSON header)."""
        header = {"version": CACHE_VERSION, "names": list(self.names), "params": list(self.params),
                  "widths": list(self.widths), "fingerprint": self.fingerprint, "target": self.target,
                  "num_utts": self.num_utts}
        buf = io.BytesIO()
        np.savez(buf, omega=self.omega, header=np.array(json.dumps(header)))
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: PathLike, expected_fingerprint: Optional[str] = None) -> "SensitivityTable":
        """Read a cached table; with ``expected_fingerprint`` refuse one measured on another model
        or with other options (the message says which file and what to do)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                omega = np.asarray(data["omega"], dtype=np.float64)
        except (OSError, ValueError, KeyError) as err:
            raise SensitivityError(f"sensitivity cache {path} is not a readable table ({err}); delete it") from None
        if header.get("version") != CACHE_VERSION:
            raise SensitivityError(f"sensitivity cache {path} has format version {header.get('version')}, "
                                   f"this code reads {CACHE_VERSION}; delete it to measure again")
        table = cls(tuple(header["names"]), tuple(int(p) for p in header["params"]),
                    tuple(int(w) for w in header["widths"]), omega, header["fingerprint"], header["target"],
                    int(header["num_utts"]))
        if expected_fingerprint is not None and table.fingerprint != expected_fingerprint:
            raise SensitivityError(
                f"sensitivity cache {path} was measured on another model or with other options "
                f"(fingerprint {table.fingerprint[:12]}, this run {expected_fingerprint[:12]}); "
                "delete it or choose another cache path")
        return table


def measured_layers(model: torch.nn.Module, include_decoder: bool = True) -> Dict[str, torch.nn.Module]:
    """The sub-layers Omega is measured for: every Linear/Conv1d of the encoder (and decoder), in
    module order, by full name. Layers that are not QAT candidates by default (the conv2d input
    layer, the embedding) are left out; the CTC projection belongs to neither and stays fp."""
    roots = ["encoder"] + (["decoder"] if include_decoder and getattr(model, "decoder", None) is not None else [])
    layers: Dict[str, torch.nn.Module] = {}
    for root in roots:
        for name, module in getattr(model, root).named_modules():
            if name and layer_kind(module) in MEASURED_KINDS:
                layers[f"{root}.{name}"] = module
    if not layers:
        raise SensitivityError("the model has no Linear/Conv1d layer in its encoder or decoder to measure")
    return layers


def fingerprint(model: torch.nn.Module, **options: Any) -> str:
    """SHA-256 of the model's state (names, shapes, bytes) and the measurement options."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def _mean_kl(ref_logp: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor) -> Tuple[float, int]:
    """Summed ``KL(p_ref || p)`` over the positions in ``mask`` and their count."""
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return float(kl[mask].sum()), int(mask.sum())


def _length_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    return torch.arange(size)[None, :] < lengths[:, None]


class _Probe:
    """The fp model's reference outputs on the held-out batches, and the same outputs with one
    weight replaced. Holds the fp encoder outputs for the decoder layers."""

    def __init__(self, model: torch.nn.Module, batches: Sequence[Batch], target: str) -> None:
        self.model, self.batches, self.target = model, list(batches), target
        self.ref_enc = [self._encode(b) for b in self.batches]
        self.ref_dec = [self._decode(b, enc) for b, enc in zip(self.batches, self.ref_enc)] \
            if getattr(model, "decoder", None) is not None else []

    def _encode(self, b: Batch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # a copy: ESPnet's global_mvn normalizes a frontend-less model's input in place
        enc, lens = self.model.encode(b["speech"].clone(), b["speech_lengths"])
        # float64 from here: at 6-8 bits the KL (~1e-9) is below float32's rounding of log-probs
        logits = self.model.ctc.ctc_lo(enc) if self.target == "ctc" else enc
        logp = torch.log_softmax(logits.double(), dim=-1)
        return enc, lens, logp

    def _decode(self, b: Batch, enc: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        from espnet.nets.pytorch_backend.transformer.add_sos_eos import add_sos_eos

        m = self.model
        ys_in, _ = add_sos_eos(b["text"], m.sos, m.eos, m.ignore_id)
        ys_in_lens = b["text_lengths"] + 1
        out, _ = m.decoder(enc[0], enc[1], ys_in, ys_in_lens)
        return torch.log_softmax(out.double(), dim=-1), _length_mask(ys_in_lens, out.size(1))

    def encoder_kl(self) -> float:
        total, count = 0.0, 0
        for b, (_, ref_lens, ref) in zip(self.batches, self.ref_enc):
            _, lens, logp = self._encode(b)
            s, n = _mean_kl(ref, logp, _length_mask(ref_lens, ref.size(1)))
            total, count = total + s, count + n
        return total / max(count, 1)

    def decoder_kl(self) -> float:
        total, count = 0.0, 0
        for b, enc, (ref, mask) in zip(self.batches, self.ref_enc, self.ref_dec):
            logp, _ = self._decode(b, enc)
            s, n = _mean_kl(ref, logp, mask)
            total, count = total + s, count + n
        return total / max(count, 1)


def _progress(items: List[Any], enabled: bool) -> Iterable[Any]:
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="sensitivity", unit="layer")


@torch.no_grad()
def measure(model: torch.nn.Module, batches: Sequence[Batch], widths: Sequence[int] = DEFAULT_WIDTHS,
            target: str = "encoder", per_channel: bool = False, include_decoder: bool = True,
            progress: bool = True, fingerprint_value: str = "") -> SensitivityTable:
    """Omega_i(n) (eq. 7) of every sub-layer of :func:`measured_layers` at every width.

    ``batches``: dicts with ``speech``, ``speech_lengths``, ``text``, ``text_lengths`` (the token
    ids; needed for the decoder layers). The model is put in eval mode; each weight is restored
    bit for bit after its measurement. Weight quantizers already attached must be at full precision.
    """
    if target not in TARGETS:
        raise SensitivityError(f"target '{target}' unknown; allowed: {list(TARGETS)}")
    if target == "ctc" and getattr(model, "ctc", None) is None:
        raise SensitivityError("target 'ctc' needs a model with a CTC branch")
    widths = tuple(check_bits(int(w), "widths") for w in widths)
    if not widths or len(set(widths)) != len(widths):
        raise SensitivityError(f"widths must be distinct and non-empty, got {list(widths)}")
    if not batches:
        raise SensitivityError("no held-out data to measure on")
    layers = measured_layers(model, include_decoder)
    active = [n for n, m in layers.items() if getattr(getattr(m, "weight_quantizer", None), "bits", 0)]
    if active:
        raise SensitivityError(f"measure the full-precision model: {active[0]} is quantized to "
                               f"{layers[active[0]].weight_quantizer.bits} bits")
    model.eval()
    probe = _Probe(model, batches, target)
    omega = np.zeros((len(layers), len(widths)))
    for i, name in enumerate(_progress(list(layers), progress)):
        weight = layers[name].weight
        original = weight.data.clone()
        kl = probe.encoder_kl if name.startswith("encoder.") else probe.decoder_kl
        for j, width in enumerate(widths):
            if width == 0:
                continue  # the reference itself: KL is exactly 0
            codes, scale = MaxScaleQuantizer([width], per_channel=per_channel).encode(original, width)
            weight.data.copy_(MaxScaleQuantizer.decode(codes, scale, original))
            omega[i, j] = max(kl(), 0.0)  # rounding can give -1e-9 for an unchanged output
        weight.data.copy_(original)
    params = tuple(int(layers[n].weight.numel()) for n in layers)
    return SensitivityTable(tuple(layers), params, widths, omega, fingerprint_value, target,
                            sum(int(b["speech"].size(0)) for b in batches))


def load_or_measure(cache: Optional[PathLike], model: torch.nn.Module, batches: Sequence[Batch],
                    widths: Sequence[int] = DEFAULT_WIDTHS, target: str = "encoder", per_channel: bool = False,
                    include_decoder: bool = True, progress: bool = True, data_id: str = "") -> SensitivityTable:
    """The cached table when it belongs to this model and these options, else a new measurement
    (written to ``cache`` atomically). ``data_id`` names the held-out data (e.g. its utterance ids)."""
    fp = fingerprint(model, widths=list(widths), target=target, per_channel=per_channel,
                     include_decoder=include_decoder, data=data_id)
    if cache is not None and Path(cache).exists():
        return SensitivityTable.load(cache, expected_fingerprint=fp)
    table = measure(model, batches, widths, target, per_channel, include_decoder, progress, fp)
    if cache is not None:
        table.save(cache)
    return table


def split_bits(bits: Mapping[str, int]) -> Tuple[Dict[str, int], Dict[str, int]]:
    """An allocation's per-module widths as the two ``bits`` maps of a training config: encoder
    names relative to the encoder (``encoder_conf.quant_conf.bits``), decoder names relative to
    the decoder (``model_conf.decoder_quant.bits``)."""
    enc: Dict[str, int] = {}
    dec: Dict[str, int] = {}
    for name, width in bits.items():
        root, _, rest = name.partition(".")
        if root not in ("encoder", "decoder") or not rest:
            raise AllocationError(f"'{name}' is neither an encoder nor a decoder module")
        (enc if root == "encoder" else dec)[rest] = int(width)
    return enc, dec


def config_fragment(bits: Mapping[str, int], encoder: str, per_channel: bool = False) -> Dict[str, Any]:
    """The training-config keys that make a QAT run quantize every module to its allocated width.

    ``encoder``: the source config's encoder name; the stock ``conformer`` becomes
    ``elastic_conformer`` (the same network, with the ``quant_conf`` block). Merge it into the
    fp model's config (:func:`merge_fragment`) and fine-tune from its checkpoint.
    """
    enc, dec = split_bits(bits)
    fragment: Dict[str, Any] = {"model": "compressed",
                                "encoder": "elastic_conformer" if encoder == "conformer" else encoder,
                                "encoder_conf": {"quant_conf": {"bits": enc}}}
    if per_channel:
        fragment["encoder_conf"]["quant_conf"]["per_channel"] = True
    if dec:
        fragment["model_conf"] = {"decoder_quant": {"bits": dec}}
        if per_channel:
            fragment["model_conf"]["decoder_quant"]["per_channel"] = True
    return fragment


def merge_fragment(config: Mapping[str, Any], fragment: Mapping[str, Any]) -> Dict[str, Any]:
    """``config`` with ``fragment`` merged in (nested mappings merged key by key, the rest replaced)."""
    out = dict(config)
    for key, value in fragment.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_fragment(out[key], value)
        else:
            out[key] = value
    return out


def held_out_batches(data_dir: PathLike, train_args: Any, num_utts: int = 64, batch_size: int = 16
                     ) -> Tuple[List[Batch], str]:
    """The first ``num_utts`` utterances of a Kaldi data dir (sorted ids: deterministic), prepared
    by the training config's own preprocessing (tokenizer, token list), padded into batches.

    Returns the batches and an id of the data (a hash of the utterance ids and transcripts) for
    the cache fingerprint. Plain wav paths only (``validate_data_dir`` checks them).
    """
    import soundfile

    from espnet2.tasks.asr import ASRTask
    from espnet_compress.corpus.kaldi_dir import read_table, validate_data_dir

    if num_utts <= 0 or batch_size <= 0:
        raise SensitivityError(f"num_utts and batch_size must be positive, got {num_utts}, {batch_size}")
    data_dir = Path(data_dir)
    validate_data_dir(data_dir)
    wavs = read_table(data_dir / "wav.scp")[:num_utts]
    texts = {r.key: r.value for r in read_table(data_dir / "text")}
    preprocess = ASRTask.build_preprocess_fn(train_args, train=False)
    items = []
    for row in wavs:
        if row.value.endswith("|"):
            raise SensitivityError(f"{data_dir / 'wav.scp'}: {row.key} is a piped command; "
                                   "sensitivity reads plain audio files")
        speech, _ = soundfile.read(row.value, dtype="float32")
        sample = {"speech": speech, "text": texts[row.key]}
        items.append(preprocess(row.key, sample) if preprocess is not None else sample)
    batches = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        speech = [torch.as_tensor(it["speech"], dtype=torch.float32) for it in chunk]
        text = [torch.as_tensor(it["text"], dtype=torch.long) for it in chunk]
        batches.append({
            "speech": torch.nn.utils.rnn.pad_sequence(speech, batch_first=True),
            "speech_lengths": torch.tensor([len(x) for x in speech]),
            "text": torch.nn.utils.rnn.pad_sequence(text, batch_first=True, padding_value=-1),
            "text_lengths": torch.tensor([len(x) for x in text]),
        })
    data_id = hashlib.sha256("\n".join(f"{r.key} {texts[r.key]}" for r in wavs).encode()).hexdigest()
    return batches, data_id
