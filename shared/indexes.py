"""Which model's collection answers searches, and which collections catalogue changes reach.

Every embedding model has its own collection (``lookalike__<model id>``): vectors of two
models never mix. A model upgrade (``lookalike reindex --model NEW``) moves through states
kept in the store as one document, so every function in every process reads the same:

============  ===========================  =============  ==========================
state         document                     searches use   catalogue changes go to
============  ===========================  =============  ==========================
serving       active=OLD                   OLD            OLD
building      active=OLD, building=NEW     OLD            OLD and NEW
switched      active=NEW, previous=OLD     NEW            NEW and OLD (rollback ready)
rolled back   active=OLD, previous=NEW     OLD            OLD and NEW
finished      active=NEW                   NEW            NEW (OLD's collection dropped)
============  ===========================  =============  ==========================

The state changes only through :class:`~lookalike.shared.messages.IndexCommand` messages,
applied by embed (which holds the models) in the order they were sent. Each command has an
id and the document records the last one applied, so a redelivered command changes nothing.
A search is answered from the collection of the model that embedded its photo, which was
active when it was embedded: a collection still being built never answers one.

No document (a store that never saw a reindex): ``EMBED_MODEL``'s collection is active.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from lookalike.shared.stores import VectorStore

STATE_DOC = "index_state"
ACTIONS = ("build", "switch", "rollback", "finish", "abort")


@dataclass(frozen=True)
class ModelRef:
    id: str  # names the collection
    spec: str  # what EMBED_MODEL takes to load it: a registered id or a fine-tuned model directory

    @classmethod
    def from_doc(cls, doc: dict | None) -> "ModelRef | None":
        return cls(doc["id"], doc.get("spec") or doc["id"]) if doc else None


@dataclass(frozen=True)
class IndexState:
    active: ModelRef
    building: ModelRef | None = None
    previous: ModelRef | None = None
    last_command: str = ""  # id of the last command applied
    retired: ModelRef | None = None  # the last command took this model out of service: drop its collection

    def live(self) -> list[ModelRef]:
        """Models whose collections receive catalogue changes, the active one first."""
        return [m for m in (self.active, self.building, self.previous) if m is not None]

    def describe(self) -> str:
        parts = [f"active {self.active.id}"]
        if self.building:
            parts.append(f"building {self.building.id}")
        if self.previous:
            parts.append(f"previous {self.previous.id} (rollback ready)")
        return ", ".join(parts)

    def to_doc(self) -> dict:
        ref = lambda m: None if m is None else {"id": m.id, "spec": m.spec}  # noqa: E731
        return {"active": ref(self.active), "building": ref(self.building), "previous": ref(self.previous),
                "last_command": self.last_command, "retired": ref(self.retired)}

    @classmethod
    def from_doc(cls, doc: dict) -> "IndexState":
        return cls(active=ModelRef.from_doc(doc["active"]), building=ModelRef.from_doc(doc.get("building")),
                   previous=ModelRef.from_doc(doc.get("previous")), last_command=doc.get("last_command", ""),
                   retired=ModelRef.from_doc(doc.get("retired")))

    def check(self, action: str, model: str | None = None) -> None:
        """Raise ValueError (saying why) when ``action`` cannot follow this state."""
        if action not in ACTIONS:
            raise ValueError(f"unknown index action {action!r}; known: {', '.join(ACTIONS)}")
        if action == "build":
            if not model:
                raise ValueError("build needs a model")
            if model in {m.id for m in self.live()} - ({self.building.id} if self.building else set()):
                raise ValueError(f"model {model} is already {'active' if model == self.active.id else 'live'}: "
                                 f"{self.describe()}")
            if self.building and self.building.id != model:
                raise ValueError(f"{self.building.id} is being built; abort it first (lookalike reindex --abort)")
            if self.previous:
                raise ValueError(f"{self.describe()}: finish or roll back first (lookalike reindex --finish)")
        elif action in ("switch", "abort"):
            if self.building is None:
                raise ValueError(f"nothing is being built ({self.describe()})")
            if model and model != self.building.id:
                raise ValueError(f"{self.building.id} is being built, not {model}")
        elif self.previous is None:  # rollback, finish
            raise ValueError(f"no previous model to {'roll back to' if action == 'rollback' else 'retire'} "
                             f"({self.describe()})")

    def apply(self, command_id: str, action: str, model: ModelRef | None = None) -> "IndexState":
        """The state after the command; the same state when it was the last one applied (a redelivery).
        ``model``: the one to build; for switch and abort, checked against the one being built."""
        if command_id == self.last_command:
            return self
        self.check(action, model.id if model else None)
        base = replace(self, last_command=command_id, retired=None)
        if action == "build":
            return replace(base, building=model)
        if action == "switch":
            return replace(base, active=self.building, building=None, previous=self.active)
        if action == "rollback":
            return replace(base, active=self.previous, previous=self.active)
        if action == "finish":
            return replace(base, previous=None, retired=self.previous)
        return replace(base, building=None, retired=self.building)  # abort


def default_model(settings) -> ModelRef:
    """EMBED_MODEL's model: active in a store that never saw a reindex (``auto`` as what it chose here)."""
    from lookalike.shared.embedders import resolve_model_id

    model_id = resolve_model_id(settings.embed_model, **settings.embedder_options())
    return ModelRef(model_id, model_id if settings.embed_model == "auto" else settings.embed_model)


class Indexes:
    """The index state as the functions read it: from the store, on every use (it is one small
    document), so a command applied by any process takes effect everywhere at once."""

    def __init__(self, store: VectorStore | None, default: ModelRef, collection_of: Callable[[str], str]):
        self.store = store
        self.default = default
        self.collection_of = collection_of

    @classmethod
    def fixed(cls, store: VectorStore | None, collection: str, model_id: str = "") -> "Indexes":
        """One named collection for ``model_id`` (tests, tools); other models get ``<collection>__<id>``."""
        return cls(store, ModelRef(model_id, model_id),
                   lambda m: collection if m == model_id else f"{collection}__{m}")

    def state(self) -> IndexState:
        doc = self.store.read_doc(STATE_DOC) if self.store is not None else None
        return IndexState.from_doc(doc) if doc else IndexState(active=self.default)

    def save(self, state: IndexState) -> None:
        self.store.write_doc(STATE_DOC, state.to_doc())

    def collection(self, model_id: str) -> str:
        return self.collection_of(model_id)

    def active_collection(self) -> str:
        return self.collection(self.state().active.id)
