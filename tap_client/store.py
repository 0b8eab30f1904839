"""The agent's disk state: personal model, histories, the pending upload, final outputs.

Layout of ``--state DIR``:

    silo.json + silo-<tag>.safetensors      SiloState and the personal model (trainable values)
    update.json + update-<tag>.safetensors  the last round's upload, kept until the server moves on
    federation.json                        which federation and silo this directory belongs to
    results.json                           stage-2 metrics (also sent to the server)
    final_model.safetensors                the silo's final model (trainable values + JSON metadata)

A restarted agent loses nothing: it reloads the personal model and, when the
server asks again for a round it already trained (e.g. after a server restart),
re-sends the saved update instead of training twice.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

from safetensors import safe_open

from tap_core.errors import TapError
from tap_core.messages import ClientUpdate, RoundStats, SiloResult
from tap_core.model.tap_model import ComponentValues
from tap_core.silo import SiloState
from tap_core.atomic_files import atomic_write_json
from tap_core.store import CheckpointStore, atomic_save_tensors, load_tensors

FINAL_MODEL = "final_model.safetensors"


@contextlib.contextmanager
def _writing(directory: Path, what: str) -> Iterator[None]:
    """A failed write (disk full, read-only volume) becomes a clear error; the previous files are intact."""
    try:
        yield
    except OSError as exc:
        raise TapError(
            f"cannot write {what} in the agent's state dir {directory} ({exc.strerror or exc}); the "
            "previous state there is intact: free space or make the directory writable, then start the "
            "agent again (it resumes from that state)"
        ) from exc


class ClientStore:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        with _writing(self.directory, "anything"):
            self.directory.mkdir(parents=True, exist_ok=True)
        self.silo = CheckpointStore(self.directory, "silo")
        self.update = CheckpointStore(self.directory, "update")

    def claim(self, federation_id: str, silo_id: str) -> None:
        """Bind this directory to one federation and silo; refuse state written for another."""
        marker = self.directory / "federation.json"
        if marker.is_file():
            owner = json.loads(marker.read_text())
            if owner != {"federation_id": federation_id, "silo": silo_id}:
                raise TapError(
                    f"state dir {self.directory} belongs to silo {owner.get('silo')} of federation "
                    f"{owner.get('federation_id', '?')[:12]}…, not silo {silo_id} of {federation_id[:12]}…; "
                    "use another --state (or delete this one to start over)"
                )
            return
        if any(self.directory.iterdir()):
            raise TapError(
                f"state dir {self.directory} is not empty and was not written by tap-client; use another --state"
            )
        with _writing(self.directory, "federation.json"):
            atomic_write_json(marker, {"federation_id": federation_id, "silo": silo_id})

    # personal model + histories

    def save_silo(self, silo_id: str, state: SiloState, personal: ComponentValues | None, round_index: int) -> None:
        with _writing(self.directory, "the personal model"):
            self.silo.save(
                {"silo": silo_id, "state": state.to_json(), "round": round_index}, personal, tag=f"r{round_index}"
            )

    def load_silo(self) -> tuple[str, SiloState, ComponentValues | None] | None:
        if not self.silo.exists():
            return None
        data, values = self.silo.load()
        return data["silo"], SiloState.from_json(data["state"]), values

    # the pending upload

    def save_update(self, update: ClientUpdate) -> None:
        meta = {"silo": update.silo, "round": update.round, "weights": update.weights, "stats": update.stats.to_json()}
        with _writing(self.directory, f"the update of round {update.round}"):
            self.update.save(meta, update.values, tag=f"r{update.round}")

    def load_update(self, silo_id: str, round_index: int) -> ClientUpdate | None:
        if not self.update.exists():
            return None
        meta, values = self.update.load()
        if meta["silo"] != silo_id or int(meta["round"]) != round_index:
            return None
        return ClientUpdate(
            silo=silo_id,
            round=round_index,
            values=values or {},
            weights={k: float(v) for k, v in meta["weights"].items()},
            stats=RoundStats.from_json(meta["stats"]),
        )

    # stage 2

    def save_results(self, result: SiloResult, final_values: ComponentValues, metadata: dict[str, Any]) -> None:
        with _writing(self.directory, "the final model and results"):
            atomic_save_tensors(
                self.directory / FINAL_MODEL, final_values, metadata={"tap": json.dumps(metadata, sort_keys=True)}
            )
            atomic_write_json(self.directory / "results.json", result.to_json())

    def load_results(self) -> SiloResult | None:
        path = self.directory / "results.json"
        if not path.is_file():
            return None
        return SiloResult.from_json(json.loads(path.read_text()))

    def load_final_model(self) -> tuple[ComponentValues, dict[str, Any]] | None:
        """The final model's values and its metadata (what ``save_results`` wrote), or None before the end."""
        path = self.directory / FINAL_MODEL
        if not path.is_file():
            return None
        values = load_tensors(path)
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = json.loads((handle.metadata() or {}).get("tap", "{}"))
        except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            raise TapError(f"cannot read the metadata of {path}: {exc}") from exc
        return values, metadata

    def owner(self) -> dict[str, str] | None:
        """{"federation_id", "silo"} this directory belongs to (see ``claim``), or None."""
        marker = self.directory / "federation.json"
        return json.loads(marker.read_text()) if marker.is_file() else None
