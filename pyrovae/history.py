"""The per-epoch record of a fit (:class:`History`) and its files: JSON lines, CSV, and a
pandas data frame."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

HISTORY_COLUMNS = ("epoch", "train_elbo", "valid_elbo", "seconds", "learning_rate")
"""Columns of a history trained by an ELBO (``trace_elbo``, ``trace_meanfield_elbo``);
other objectives record ``train_objective`` (the objective's own bound, named in
``objective``) in place of ``train_elbo``, which they do not measure."""


@dataclass
class History:
    """Per-epoch training record.

    ``train_elbo`` is the average over the epoch's steps of the minibatch ELBO per data
    point; ``valid_elbo`` the ELBO per data point on the validation data after the epoch
    (one draw per point, analytic KL when the objective uses it). Both in nats, higher is
    better; ``valid_elbo`` is ``None`` without validation data. ``learning_rate`` is Adam's
    step size during the epoch.
    """

    records: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def column(self, name: str) -> list:
        return [record[name] for record in self.records]

    def to_jsonl(self, path: str | Path) -> None:
        """One JSON record per line, written atomically (:func:`pyrovae.outputs.write_file`)."""
        from pyrovae.outputs import write_file

        lines = [json.dumps(record) + "\n" for record in self.records]
        write_file(path, lambda handle: handle.writelines(lines), "jsonl")

    def to_dataframe(self):
        """One row per epoch (columns as in :meth:`to_csv`) as a :class:`pandas.DataFrame`;
        needs pandas, which pyrovae does not require."""
        try:
            import pandas
        except ImportError as error:
            raise ImportError("to_dataframe() needs pandas: pip install pandas") from error
        return pandas.DataFrame(self.records, columns=self.columns)

    def to_csv(self, path: str | Path) -> None:
        """The records as CSV, written atomically (:func:`pyrovae.outputs.write_file`)."""
        from pyrovae.outputs import write_file

        write_file(path, lambda handle: write_history_csv(self, handle), "csv")

    @property
    def columns(self) -> list[str]:
        """Column names in record order (:data:`HISTORY_COLUMNS` for ELBO objectives)."""
        names: dict[str, None] = {}
        for record in self.records:
            names.update(dict.fromkeys(record))
        return list(names) or list(HISTORY_COLUMNS)


def write_history_csv(history: History, handle) -> None:
    """Write ``history`` as CSV to an open text file."""
    writer = csv.DictWriter(handle, fieldnames=history.columns)
    writer.writeheader()
    writer.writerows(history.records)
