"""Silence known-harmless third-party chatter, at our command-line entry points only.

On a bad input the user's error must be the one line printed, and a run's log should be ours. A
library user who imports janus_pretrain keeps every warning: these filters are installed by the
CLIs' `main`, before DeepSpeed is imported (it logs at import time).
"""
import logging
import warnings

# DeepSpeed's notice at import that it fell back to the CPU accelerator: on CPU that is the plan,
# and on GPU the device is chosen by parallel/state.py, not by this notice.
_DEEPSPEED_NOTICES = ("Setting accelerator to CPU",)


def _not_a_known_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_DEEPSPEED_NOTICES)


def silence_third_party() -> None:
    # A filter on the logger itself: DeepSpeed re-sets the level and adds its handler at import.
    logging.getLogger("DeepSpeed").addFilter(_not_a_known_notice)
    # DeepSpeed's ZeRO calls the collective under its deprecated name; nothing for us to change.
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated")
    # DeepSpeed wraps the optimizer after our scheduler was built, hiding the counter torch's
    # order check looks for; engine.step() does step the optimizer before the scheduler.
    warnings.filterwarnings("ignore", category=UserWarning,
                            message=r"Seems like `optimizer\.step\(\)` has been overridden")
