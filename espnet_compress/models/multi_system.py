"""Many systems of one set of weights in one training step (the all-in-one supernet, foldable
depths, precisions): ``L = L_largest + sum_i w_i L_i + kl_weight sum_i KL(stopgrad(p_largest) || p_i)``.

A system with ``stochastic_bits`` trains a freshly drawn per-layer precision mix in every step
(:class:`~espnet_compress.models.systems.StochasticPrecision`); with ``kl_target: hybrid`` and
``kl_reduction: utterance`` the KL is weighted and normalised like ESPnet's own CTC/attention loss,
which is the one-bit ASR authors' co-training loss ``w (CTC + att) + kl_weight (KL_ctc + KL_att)``
under the same ``ctc_weight`` split.

Each system's ``L`` is ESPnet's own hybrid CTC/attention loss: the stock ``forward`` runs once per
system with that system's plan, so nothing of ESPnet's loss is re-implemented. This module holds
that step (system selection, sampling, the KL term, RNG alignment, shared features); the
ESPnet-facing model class (:mod:`~espnet_compress.models.compressed_asr`) mixes it in.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from espnet2.asr.espnet_model import ESPnetASRModel, autocast, autocast_type
from espnet2.torch_utils.device_funcs import force_gatherable

from espnet_compress.core.sharing import SharedComputation
from espnet_compress.env import settings
from espnet_compress.models.systems import SystemSampler, SystemSpec, SystemSpecError, parse_systems
from espnet_compress.quant.api import set_bits

log = logging.getLogger(__name__)


class MultiSystemMixin:
    """Mixin (before ``ESPnetASRModel``): ``model_conf.systems`` and the step that trains them.
    Options are documented on :class:`~espnet_compress.models.compressed_asr.CompressedASRModel`."""

    KL_TARGETS = ("decoder", "ctc", "both", "hybrid")
    KL_REDUCTIONS = ("token", "utterance")
    SYSTEM_LOSSES = ("sum", "mean")

    def _setup_systems(self, systems: Optional[Mapping[str, Any]], largest: Optional[str], kl_weight: float,
                       kl_target: str, sampling: str, num_random: int, seed: int,
                       decode_system: Optional[str], kl_reduction: str = "token", system_loss: str = "sum") -> None:
        self.systems: Dict[str, SystemSpec] = {}
        self.active_system: Optional[str] = None
        if systems is None:
            if largest or decode_system or system_loss != "sum":
                raise SystemSpecError("model_conf.largest/decode_system/system_loss need model_conf.systems")
            env_system = settings().system
            if env_system:
                raise SystemSpecError(f"ESPNET_COMPRESS_SYSTEM={env_system} is set but this model declares no "
                                      f"model_conf.systems; unset it (a single-system model has one decode)")
            return
        self.systems = parse_systems(systems, self.encoder, self.decoder)
        self.largest = largest if largest is not None else next(iter(self.systems))
        if self.largest not in self.systems:
            raise SystemSpecError(f"model_conf.largest: '{self.largest}' is not a system ({list(self.systems)})")
        if kl_target not in self.KL_TARGETS:
            raise SystemSpecError(f"model_conf.kl_target: '{kl_target}' unknown; allowed: {list(self.KL_TARGETS)}")
        if kl_weight < 0:
            raise SystemSpecError(f"model_conf.kl_weight must be >= 0, got {kl_weight}")
        if kl_reduction not in self.KL_REDUCTIONS:
            raise SystemSpecError(f"model_conf.kl_reduction: '{kl_reduction}' unknown; allowed: {list(self.KL_REDUCTIONS)}")
        if system_loss not in self.SYSTEM_LOSSES:
            raise SystemSpecError(f"model_conf.system_loss: '{system_loss}' unknown; allowed: {list(self.SYSTEM_LOSSES)}")
        uses_decoder = self.decoder is not None and self.ctc_weight < 1.0
        if kl_target in ("decoder", "both", "hybrid") and not uses_decoder:
            raise SystemSpecError(f"model_conf.kl_target '{kl_target}' needs the attention decoder, but this model is "
                                  f"CTC-only (no decoder or ctc_weight 1.0); use kl_target: ctc")
        if kl_target in ("ctc", "both", "hybrid") and self.ctc_weight == 0.0:
            raise SystemSpecError(f"model_conf.kl_target '{kl_target}' needs CTC, but ctc_weight is 0; use kl_target: decoder")
        self.kl_weight, self.kl_target, self.kl_reduction = float(kl_weight), kl_target, kl_reduction
        self.system_loss = system_loss
        self.sampling_seed = seed
        costs = {n: self.encoder.executed_weight_bits(s.plan) for n, s in self.systems.items()}
        smallest = min(costs, key=costs.get)
        self.sampler = SystemSampler(list(self.systems), self.largest, smallest, sampling, num_random, seed)
        # Persistent: after --resume the draws continue the sequence instead of restarting at step 0.
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self._register_load_state_dict_pre_hook(self._fill_step_counter, with_module=False)
        self.encoder.track_norm_stats({n: s.plan for n, s in self.systems.items()}, self.largest)
        self._captured: Dict[str, torch.Tensor] = {}
        self._rng_role: Optional[str] = None  # "teacher" / "student" inside a multi-system step
        self._decoder_rng: Optional[_RngState] = None
        self._student_rng: Optional[_RngState] = None
        if self.decoder is not None:
            self.decoder.register_forward_pre_hook(self._align_decoder_rng)
            self.decoder.register_forward_hook(self._restore_student_rng)
            self.decoder.register_forward_hook(self._capture("decoder"))
        if self.ctc is not None:
            self.ctc.register_forward_pre_hook(self._open_ctc_capture)
            self.ctc.register_forward_hook(self._capture("ctc"))
            self.ctc.ctc_lo.register_forward_hook(self._capture("ctc_logits"))
        env_system = settings().system
        self.use_system(env_system or decode_system or self.largest)
        if env_system:
            self.encoder.blocks.decode_env = True
        self.encoder.apply_env_plan()
        spec = self.systems[self.active_system]
        log.info("espnet_compress: %d systems %s; active system '%s' (plan %s, decoder bits %d)",
                 len(self.systems), list(self.systems), self.active_system, self.encoder.plan.to_config(),
                 spec.decoder_bits)

    def _fill_step_counter(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        """Checkpoints written before the counter was stored resume (strictly) at step 0."""
        if not prefix and "num_steps" not in state_dict:
            state_dict["num_steps"] = self.num_steps.clone()

    def _open_ctc_capture(self, module: torch.nn.Module, inputs: Tuple[Any, ...]) -> None:
        """Capture the posteriors of the *first* CTC loss of a system's forward only: ESPnet
        computes the final layer's CTC loss before any intermediate one (``interctc_weight``), and
        the encoder's own CTC calls (self-conditioning) go through ``ctc.softmax``, not here."""
        self._ctc_capturing = "ctc_lens" not in self._captured

    def _capture(self, key: str):
        """Forward hook keeping a sub-module's output of this system's forward (for the KL term)."""

        def hook(module: torch.nn.Module, inputs: Tuple[Any, ...], output: Any) -> None:
            if key == "decoder":
                self._captured["decoder"] = output[0] if isinstance(output, tuple) else output
            elif getattr(self, "_ctc_capturing", False):
                if key == "ctc":
                    self._captured["ctc_lens"] = inputs[1]
                    self._ctc_capturing = False
                else:
                    self._captured[key] = output

        return hook

    def _align_decoder_rng(self, module: torch.nn.Module, inputs: Tuple[Any, ...]) -> None:
        """Every system's decoder draws the teacher's dropout masks (the decoder's shapes are the
        same for all systems), so the KL term measures how the systems differ, not two dropout
        draws: a system equal to the largest has KL 0 in training too. The student's decoder runs
        on a fork of the RNG: its own stream resumes after the decoder, so the next student's
        encoder does not replay this one's dropout masks."""
        if self._rng_role == "teacher":
            self._decoder_rng = _RngState.capture(inputs[0].device)
        elif self._rng_role == "student" and self._decoder_rng is not None:
            self._student_rng = _RngState.capture(inputs[0].device)
            self._decoder_rng.restore()

    def _restore_student_rng(self, module: torch.nn.Module, inputs: Tuple[Any, ...], output: Any) -> None:
        if self._student_rng is not None:
            self._student_rng.restore()
            self._student_rng = None

    def use_system(self, name: str) -> SystemSpec:
        """Make ``name`` the system that ``encode``/``forward``/decoding run."""
        if name not in self.systems:
            raise SystemSpecError(f"unknown system '{name}'; this model holds {list(self.systems)}")
        spec = self.systems[name]
        self.encoder.set_plan(spec.plan)
        if self.decoder is not None:
            set_bits(self.decoder, (("*", spec.decoder_bits),))
        dq = getattr(self, "decoder_quant", None)
        if dq is not None and dq.ctc:  # decoder_bits covers all decoder_quant quantizes, as export writes it
            set_bits(self.ctc, (("*", spec.decoder_bits),))
        self.active_system = name
        return spec

    @contextlib.contextmanager
    def system(self, name: str) -> Iterator[SystemSpec]:
        """Run the body with system ``name`` active, then restore the previous one."""
        previous = self.active_system
        try:
            yield self.use_system(name)
        finally:
            if previous is not None:
                self.use_system(previous)

    @contextlib.contextmanager
    def _features_once(self, speech: torch.Tensor,
                       speech_lengths: torch.Tensor) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """The feature part of ESPnet's ``encode`` (front end, SpecAugment in training,
        normalisation, pre-encoder), run once; inside the body those modules are switched off so
        that each system's stock ``forward`` takes the shared features as its input.

        Running them once is also what keeps the systems' inputs correct: without a front end,
        SpecAugment and GlobalMVN modify the batch in place, so a second pass would augment and
        normalise it twice.
        """
        with autocast(self.autocast_frontend, dtype=autocast_type):
            feats, lengths = self._extract_feats(speech, speech_lengths)
            if self.specaug is not None and self.training:
                feats, lengths = self.specaug(feats, lengths)
            if self.normalize is not None:
                feats, lengths = self.normalize(feats, lengths)
        if self.preencoder is not None:
            feats, lengths = self.preencoder(feats, lengths)
        names = ("frontend", "specaug", "normalize", "preencoder")
        saved = {n: getattr(self, n) for n in names}
        for n in names:
            setattr(self, n, None)
        try:
            yield feats, lengths
        finally:
            for n, module in saved.items():
                setattr(self, n, module)

    def _kl(self, teacher: Dict[str, torch.Tensor], student: Dict[str, torch.Tensor],
            text_lengths: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student) over real (non-padded) tokens or frames: averaged over them
        (``kl_reduction: token``) or summed per utterance and averaged over the batch
        (``utterance``, ESPnet's own normalisation of CTC and attention losses). ``both`` is the mean
        of the two KLs, ``hybrid`` weights them like ESPnet's loss: ``ctc_weight`` KL_ctc +
        ``(1 - ctc_weight)`` KL_att."""
        per_utt = self.kl_reduction == "utterance"
        parts = {}
        if self.kl_target in ("decoder", "both", "hybrid"):
            t, s = teacher["decoder"], student["decoder"]
            mask = torch.arange(t.shape[1], device=t.device)[None, :] < (text_lengths + 1)[:, None]
            parts["att"] = _masked_kl(t, s, mask, per_utt)
        if self.kl_target in ("ctc", "both", "hybrid"):
            t, s = teacher["ctc_logits"], student["ctc_logits"]
            mask = torch.arange(t.shape[1], device=t.device)[None, :] < teacher["ctc_lens"][:, None]
            parts["ctc"] = _masked_kl(t, s, mask, per_utt)
        if self.kl_target == "hybrid":
            return self.ctc_weight * parts["ctc"] + (1.0 - self.ctc_weight) * parts["att"]
        return sum(parts.values()) / len(parts)


    @contextlib.contextmanager
    def _drawn_precision(self, name: str, step: int) -> Iterator[None]:
        """In training, run a stochastic-precision system with its draw for ``step`` (a plan with the
        system's name, blocks and widths, so its norm statistics stay its own: the draw is
        registered as the system's statistics plan for the body). Other systems, and evaluation,
        run the declared plan (a stochastic system's most likely mix)."""
        spec = self.systems[name]
        if spec.stochastic is None or not self.training:
            yield
            return
        drawn = spec.plan_for_step(self.encoder, step, self.sampling_seed)
        plans = {n: s.plan for n, s in self.systems.items()}
        self.encoder.track_norm_stats(dict(plans, **{name: drawn}), self.largest)
        try:
            self.encoder.set_plan(drawn)
            yield
        finally:
            self.encoder.track_norm_stats(plans, self.largest)

    def multi_system_forward(self, speech: torch.Tensor, speech_lengths: torch.Tensor, text: torch.Tensor,
                             text_lengths: torch.Tensor, **kwargs: Any):
        """One backward for all active systems; per-system losses appear in ESPnet's stats.

        The features (front end, SpecAugment, normalisation) are computed once per step and every
        system trains on the same augmented batch; with ``share_computation`` the encoder's input
        layer and any plan prefix two systems have in common are computed once as well (see
        :mod:`espnet_compress.core.sharing`), which is where one pass saves over separate runs.
        """
        step = int(self.num_steps)
        names = self.sampler.draw(step) if self.training else list(self.systems)
        if self.training:
            self.num_steps += 1
        if names[0] != self.largest:
            names = [self.largest] + [n for n in names if n != self.largest]
        stats: Dict[str, Optional[torch.Tensor]] = {}
        total: Optional[torch.Tensor] = None
        teacher: Dict[str, torch.Tensor] = {}
        batch_size = speech.shape[0]
        for name in self.systems:
            if name not in names:  # keep the stats keys constant across steps (reported as nan)
                stats.update({f"{key}_{name}": None for key in ("loss", "acc", "kl")})
        memo = SharedComputation()
        sharing = self.encoder.sharing(memo) if self.share_computation else contextlib.nullcontext()
        with self._features_once(speech, speech_lengths) as (feats, feats_lengths), sharing:
            for name in names:
                self._rng_role = "teacher" if name == self.largest else "student"
                self._captured = {}
                try:
                    with self.system(name), self._drawn_precision(name, step):
                        loss, sys_stats, _ = super().forward(feats, feats_lengths, text, text_lengths, **kwargs)
                finally:
                    self._rng_role = None
                captured = dict(self._captured)
                stats[f"loss_{name}"] = loss.detach()
                stats[f"acc_{name}"] = sys_stats.get("acc")
                if name == self.largest:
                    teacher = {k: v.detach() for k, v in captured.items()}
                    total = loss
                    stats.update({k: v for k, v in sys_stats.items() if k != "loss"})
                    continue
                kl = self._kl(teacher, captured, text_lengths)
                total = total + self.systems[name].weight * loss + self.kl_weight * kl
                stats[f"kl_{name}"] = kl.detach()
        if self.system_loss == "mean":
            total = total / len(names)
        self.last_step_sharing = (memo.hits, memo.misses)
        self._captured = {}  # holds graph tensors: only the step itself needs them (and a copy of the model fails on them)
        accs = [stats[f"acc_{n}"] for n in names]
        if len(names) == len(self.systems) and all(a is not None for a in accs):
            # checkpoint selection over every system (``--best_model_criterion valid acc_mean max``)
            stats["acc_mean"] = sum(float(a) for a in accs) / len(accs)
            stats["acc_worst"] = min(float(a) for a in accs)
        stats["loss"] = total.detach()
        loss, stats, weight = force_gatherable((total, stats, batch_size), total.device)
        return loss, stats, weight



def multi_system_options() -> Tuple[str, ...]:
    """``model_conf`` options of the multi-system model that a single exported system drops: the
    model's own constructor options except ``decoder_quant`` (derived, so a new option can never be
    written into a standalone config that ESPnet's ``espnet`` model rejects)."""
    from espnet_compress.models.compressed_asr import CompressedASRModel

    base = set(inspect.signature(ESPnetASRModel.__init__).parameters)
    own = inspect.signature(CompressedASRModel.__init__).parameters
    return tuple(n for n in own if n not in base and n != "decoder_quant")


def _masked_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor,
               per_utterance: bool = False) -> torch.Tensor:
    log_t = torch.log_softmax(teacher_logits.float(), dim=-1)
    log_s = torch.log_softmax(student_logits.float(), dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    if per_utterance:
        return (kl * mask).sum() / mask.shape[0]
    return (kl * mask).sum() / mask.sum().clamp(min=1)


class _RngState:
    """Snapshot of the torch RNG(s) on a device, to replay the same random draws."""

    def __init__(self, cpu: torch.Tensor, cuda: Optional[List[torch.Tensor]]) -> None:
        self.cpu, self.cuda = cpu, cuda

    @classmethod
    def capture(cls, device: torch.device) -> "_RngState":
        cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
