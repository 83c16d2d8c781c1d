"""``elastic_wav2vec2``: wav2vec2 / HuBERT under a plan, with the same features as the Conformer.

wav2vec2 and HuBERT fine-tune the same network (a CNN waveform feature extractor, a projection, a
convolutional positional embedding and a stack of Transformer layers; torchaudio builds both as
``Wav2Vec2Model``), so one host class serves both; only the pretrained weights differ. The
Transformer layers are the plan's blocks (skip, repeat, narrow their FFNs, set their bits), exactly
as the Conformer's blocks are, and the same features (``quant_conf``, ``fold``) apply.

Nothing is downloaded: the network is built from the options (torchaudio's names, as in ESPnet's
``torchaudio_hubert`` encoder), and ``pretrained_path`` loads weights from a local file holding
a torchaudio ``Wav2Vec2Model`` state dict, e.g. written once, where the models are reachable, by
``torch.save(torchaudio.pipelines.HUBERT_BASE.get_model().state_dict(), "hubert_base.pth")``.
The encoder takes raw 16 kHz waveforms: train with ``input_size: 1`` (no ESPnet front end),
``normalize: null`` and no SpecAugment.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch
from espnet2.asr.encoder.abs_encoder import AbsEncoder
from torchaudio.models import wav2vec2_model

from espnet_compress.core.elastic import ElasticLayerList, ElasticTorchaudioFeedForward
from espnet_compress.encoders.elastic import ElasticEncoder, PlanLike, with_feature_options
from espnet_compress.features import FEATURES

#: torchaudio's (and fairseq's) base architecture: 7 conv layers, 20 ms frames
BASE_CONV_LAYERS: Tuple[Tuple[int, int, int], ...] = (
    (512, 10, 5), (512, 3, 2), (512, 3, 2), (512, 3, 2), (512, 3, 2), (512, 2, 2), (512, 2, 2),
)


class Wav2Vec2LoadError(ValueError):
    """A pretrained file that is missing or does not fit the configured network."""


@with_feature_options
class ElasticWav2Vec2Encoder(ElasticEncoder, AbsEncoder):
    """wav2vec2/HuBERT encoder (torchaudio's implementation) executing an execution plan.

    Args:
        input_size: ignored (the input is the waveform); ESPnet passes it.
        plan: default plan over the Transformer layers (``blocks``, ``ffn_units``, ``bits``).
        extractor_mode, extractor_conv_layer_config, extractor_conv_bias, encoder_*: the network,
            torchaudio's ``wav2vec2_model`` options (defaults: the base model; HuBERT base and
            wav2vec2 base share them).
        pretrained_path: local torchaudio ``Wav2Vec2Model`` state dict to start from.
        pretrained_layers: which of the checkpoint's Transformer layers become this encoder's
            ``encoder_num_layers`` physical layers, in order (default: the first ones). This is how
            a foldable seed keeps a few layers of a pretrained model (``[0, 1, 2]`` of 12 ...).
        freeze_feature_extractor: keep the CNN feature extractor fixed (the usual fine-tuning
            recipe; it is also the most expensive part to back-propagate through).
        quant_conf, fold, ...: feature blocks (:mod:`espnet_compress.features`), off when absent;
            quantized module names look like ``model.encoder.transformer.layers.3.feed_forward.
            intermediate_dense``, and ``exclude: ["model.feature_extractor.*"]`` keeps the CNN fp.
    """

    FAMILY = "wav2vec2"
    SHAPE_OPTIONS = ("encoder_num_layers", "encoder_ff_interm_features")
    BUILD_ONLY_OPTIONS = (*ElasticEncoder.BUILD_ONLY_OPTIONS, "pretrained_path", "pretrained_layers")

    def __init__(
        self,
        input_size: int = 1,
        plan: PlanLike = None,
        extractor_mode: str = "group_norm",
        extractor_conv_layer_config: Optional[Sequence[Sequence[int]]] = None,
        extractor_conv_bias: bool = False,
        encoder_embed_dim: int = 768,
        encoder_projection_dropout: float = 0.1,
        encoder_pos_conv_kernel: int = 128,
        encoder_pos_conv_groups: int = 16,
        encoder_num_layers: int = 12,
        encoder_num_heads: int = 12,
        encoder_attention_dropout: float = 0.1,
        encoder_ff_interm_features: int = 3072,
        encoder_ff_interm_dropout: float = 0.0,
        encoder_dropout: float = 0.1,
        encoder_layer_norm_first: bool = False,
        encoder_layer_drop: float = 0.05,
        pretrained_path: Optional[str] = None,
        pretrained_layers: Optional[Sequence[int]] = None,
        freeze_feature_extractor: bool = True,
        **features: Any,
    ) -> None:
        unknown = sorted(set(features) - set(FEATURES))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown encoder_conf option(s) {unknown}")
        super().__init__()
        conv = [tuple(int(v) for v in layer) for layer in (extractor_conv_layer_config or BASE_CONV_LAYERS)]
        if any(len(layer) != 3 for layer in conv):
            raise ValueError("encoder_conf.extractor_conv_layer_config: every layer is [channels, kernel, stride]")
        self.model = wav2vec2_model(
            extractor_mode=extractor_mode, extractor_conv_layer_config=conv, extractor_conv_bias=extractor_conv_bias,
            encoder_embed_dim=encoder_embed_dim, encoder_projection_dropout=encoder_projection_dropout,
            encoder_pos_conv_kernel=encoder_pos_conv_kernel, encoder_pos_conv_groups=encoder_pos_conv_groups,
            encoder_num_layers=encoder_num_layers, encoder_num_heads=encoder_num_heads,
            encoder_attention_dropout=encoder_attention_dropout,
            encoder_ff_interm_features=encoder_ff_interm_features,
            encoder_ff_interm_dropout=encoder_ff_interm_dropout, encoder_dropout=encoder_dropout,
            encoder_layer_norm_first=encoder_layer_norm_first, encoder_layer_drop=0.0, aux_num_out=None,
        )
        if pretrained_path is not None:
            layers = list(range(encoder_num_layers)) if pretrained_layers is None else [int(i) for i in pretrained_layers]
            if len(layers) != encoder_num_layers:
                raise Wav2Vec2LoadError(f"encoder_conf.pretrained_layers names {len(layers)} layers, but "
                                        f"encoder_num_layers is {encoder_num_layers}")
            self._load_pretrained(Path(pretrained_path), layers)
        elif pretrained_layers is not None:
            raise Wav2Vec2LoadError("encoder_conf.pretrained_layers needs pretrained_path")
        self.freeze_feature_extractor = freeze_feature_extractor
        for p in self.model.feature_extractor.parameters():
            p.requires_grad_(not freeze_feature_extractor)
        self._output_size = encoder_embed_dim
        # layer drop moves from torchaudio's Transformer loop to the plan (per logical step)
        self._init_elastic(self.model.encoder.transformer.layers, ElasticLayerList, ElasticTorchaudioFeedForward,
                           encoder_ff_interm_features, plan, features, layer_drop_rate=encoder_layer_drop)

    def output_size(self) -> int:
        return self._output_size

    def _load_pretrained(self, path: Path, layers: List[int]) -> None:
        """Load a torchaudio ``Wav2Vec2Model`` state dict, keeping the checkpoint's Transformer
        layers ``layers`` (renumbered 0..n-1) and dropping the rest and any CTC head (``aux``)."""
        if not path.is_file():
            raise Wav2Vec2LoadError(f"encoder_conf.pretrained_path: {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
            raise Wav2Vec2LoadError(f"encoder_conf.pretrained_path: {path} is not a torch state dict ({err})") from None
        prefix = "encoder.transformer.layers."
        available = {int(k[len(prefix):].split(".", 1)[0]) for k in state if k.startswith(prefix)}
        absent = sorted(set(layers) - available)
        if absent:
            raise Wav2Vec2LoadError(f"encoder_conf.pretrained_layers: {path} has layers {sorted(available)}, "
                                    f"not {absent}")
        renumber = {src: dst for dst, src in enumerate(layers)}
        kept = {}
        for key, value in state.items():
            if key.startswith("aux."):
                continue
            if key.startswith(prefix):
                src, rest = key[len(prefix):].split(".", 1)
                if int(src) not in renumber:
                    continue
                key = f"{prefix}{renumber[int(src)]}.{rest}"
            kept[key] = value
        mine = self.model.state_dict()
        wrong = [f"{k} {tuple(v.shape)} vs {tuple(mine[k].shape)}" for k, v in kept.items()
                 if k in mine and v.shape != mine[k].shape]
        missing, unexpected = sorted(set(mine) - set(kept)), sorted(set(kept) - set(mine))
        if wrong or missing or unexpected:
            raise Wav2Vec2LoadError(
                f"encoder_conf.pretrained_path: {path} does not fit the configured network (check the "
                f"encoder_* options): shapes {wrong[:2]}, missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        self.model.load_state_dict(kept)

    def _features(self, xs_pad: torch.Tensor, ilens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Waveform -> Transformer input (CNN features, projection, positional convolution), the
        part every system of a multi-system step shares."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_feature_extractor):
            feats, lengths = self.model.feature_extractor(xs_pad, ilens)
        x, mask = self.model.encoder._preprocess(feats, lengths)
        x = self.model.encoder.transformer._preprocess(x)
        return x, mask, lengths

    def forward(self, xs_pad: torch.Tensor, ilens: torch.Tensor,
                prev_states: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, None]:
        """Waveforms ``(B, T)`` (or ``(B, T, 1)``) -> encoder output ``(B, L, D)`` and lengths."""
        if xs_pad.dim() == 3:
            if xs_pad.size(-1) != 1:
                raise ValueError(f"{type(self).__name__} takes raw waveforms (input_size: 1), got {xs_pad.size(-1)}-dim "
                                 f"features; remove the ESPnet front end")
            xs_pad = xs_pad.squeeze(-1)
        input_layer = (self.model.feature_extractor, self.model.encoder.feature_projection,
                       self.model.encoder.transformer.pos_conv_embed)
        x, mask, lengths = self._shared_input(input_layer, self._features, xs_pad, ilens)
        for step in self.blocks:
            x, _ = step(x, mask)
        transformer = self.model.encoder.transformer
        if not transformer.layer_norm_first:
            x = transformer.layer_norm(x)
        return x, lengths, None
