"""Every environment variable espnet_compress reads, read in this one place.

Stock programs (``asr_inference``, ``Speech2Text``) take no options of ours, so a few choices reach
the plugin through the environment. They are read once per process, validated, and logged when
set, so a leftover variable is visible in every log instead of silently changing a run. Two of them
choose *what a model computes* at decode time; training refuses them (an ``asr_train`` that followed
a stray ``ESPNET_COMPRESS_PLAN`` would train another network than its config says).

This module imports nothing heavy: the import hook reads ``ESPNET_COMPRESS_NO_HOOK`` at interpreter
start through it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Dict, Optional

log = logging.getLogger(__name__)

SYSTEM = "ESPNET_COMPRESS_SYSTEM"
PLAN = "ESPNET_COMPRESS_PLAN"
KERNEL = "ESPNET_COMPRESS_KERNEL"
NO_HOOK = "ESPNET_COMPRESS_NO_HOOK"

#: name -> what it does; the ``DECODE_ONLY`` ones are refused in training
VARIABLES: Dict[str, str] = {
    SYSTEM: "system of a multi-system model that decoding runs (overrides model_conf.decode_system)",
    PLAN: "execution plan (JSON) that decoding runs instead of the configured one",
    KERNEL: "CPU path of packed quantized layers (one of quant/inference.py KERNELS)",
    NO_HOOK: "1 = do not register into ESPnet at interpreter start (call espnet_compress.register())",
}
DECODE_ONLY = (SYSTEM, PLAN)


#: other libraries' variables that cap the instruction set their CPU kernels use (fbgemm's int8
#: GEMM, oneDNN's convolutions, MKL's BLAS, ATen's dispatch); read here only to report them next to
#: the CPU's features when kernels are chosen, since they change which kernel is fastest
ISA_CAP_VARIABLES = ("FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                     "ATEN_CPU_CAPABILITY")


def isa_caps() -> Dict[str, str]:
    """The ``ISA_CAP_VARIABLES`` that are set, with their values."""
    return {name: os.environ[name] for name in ISA_CAP_VARIABLES if os.environ.get(name)}


class EnvVarError(ValueError):
    """An environment variable with a value espnet_compress cannot use; the message names it."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated values (``None`` / defaults when unset)."""

    system: Optional[str] = None
    plan: Optional[Dict[str, Any]] = None
    kernel: str = "auto"

    def decode_only(self) -> Dict[str, str]:
        """The decode-only variables that are set, with their raw values."""
        return {k: os.environ[k] for k in DECODE_ONLY if os.environ.get(k)}


_logged: Dict[str, str] = {}


def hook_disabled() -> bool:
    return bool(os.environ.get(NO_HOOK))


def settings() -> Settings:
    """Read and validate the variables (each set one is logged once per value)."""
    for name in VARIABLES:
        value = os.environ.get(name)
        if value and _logged.get(name) != value:
            _logged[name] = value
            log.info("espnet_compress: %s=%s is active (%s)", name, value, VARIABLES[name])
    plan = None
    text = os.environ.get(PLAN)
    if text:
        try:
            plan = json.loads(text)
        except ValueError as err:
            raise EnvVarError(f"{PLAN}: not valid JSON ({err}): {text!r}") from None
        if not isinstance(plan, dict):
            raise EnvVarError(f"{PLAN}: expected a JSON object such as '{{\"blocks\": [0, 1]}}', got {text!r}")
        plan.setdefault("name", PLAN)
    return Settings(system=os.environ.get(SYSTEM) or None, plan=plan, kernel=os.environ.get(KERNEL) or "auto")


def refuse_in_training(where: str) -> None:
    """Raise if a decode-only variable is set: called on the first training forward of a model."""
    active = settings().decode_only()
    if active:
        raise EnvVarError(
            f"{where}: {', '.join(f'{k}={v}' for k, v in active.items())} is set while training; these variables "
            f"choose what a model computes at decode time only. Unset them for training (put the system or plan "
            f"in the config instead: model_conf.systems / encoder_conf.plan)"
        )
