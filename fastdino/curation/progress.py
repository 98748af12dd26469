"""Progress of the long curation loops (embed, the neighbour searches): a tqdm bar on a terminal;
when stderr is not one (a batch job's log file, a pipe), where tqdm shows nothing, a line through
the logger every LOG_EVERY_S seconds instead:

    embed: 12288/1281167 images (1.0%), 412.3 img/s, ETA 0:51:18
"""

from __future__ import annotations

import datetime
import logging
import sys
import time

logger = logging.getLogger("fastdino.curation")

LOG_EVERY_S = 10.0


class Progress:
    """`update(n)` after each batch, `close()` at the end. `enabled=False` (--quiet): silent.
    `initial`: rows already done (a resumed run); the rate counts this run's rows only."""

    def __init__(self, total: int, desc: str, unit: str, rate_unit: str, initial: int = 0,
                 enabled: bool = True) -> None:
        self.total, self.desc, self.unit, self.rate_unit = total, desc, unit, rate_unit
        self.done = self.start = initial
        self.bar = None
        self.logging = False
        if not enabled:
            return
        if sys.stderr is not None and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=rate_unit)
        else:
            self.logging = True
            self.t0 = self.last = time.monotonic()
            self.logged = False

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.logging:
            now = time.monotonic()
            if now - self.last >= LOG_EVERY_S:
                self.last = now
                self._log(now)

    def _log(self, now: float) -> None:
        self.logged = True
        rate = (self.done - self.start) / max(now - self.t0, 1e-9)
        pct = f" ({100 * self.done / self.total:.1f}%)" if self.total else ""
        eta = (f", ETA {datetime.timedelta(seconds=round((self.total - self.done) / rate))}"
               if rate > 0 and self.done < self.total else "")
        logger.info("%s: %d/%d %s%s, %.1f %s/s%s", self.desc, self.done, self.total, self.unit,
                    pct, rate, self.rate_unit, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.logging and self.logged:  # a last line when the run was long enough to log
            self._log(time.monotonic())
