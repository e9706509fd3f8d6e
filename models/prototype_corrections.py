"""A person's corrections of a prototype network: prototypes to forbid (shortcuts) or to keep, in a small file.

After ProtoPDebug (Bontempelli et al., "Concept-level Debugging of Part-Prototype Networks", ICLR 2023,
https://arxiv.org/abs/2205.15769): a user looks at each prototype's source patch and marks it *forbidden* (a
confounder such as a scanner marker: patches like it must not activate any prototype) or *keep* (a valid part the
model must go on recognising). ``pellucid fit --init_from <model> --corrections <file>`` fine-tunes with the forbid
and keep losses (:mod:`pellucid.training.prototypes.corrections`); ``pellucid review`` writes the file.

The file is YAML (JSON is YAML too)::

    # pellucid prototype corrections
    format: 1
    model: protopnet                # registry name of the model the prototypes belong to
    checkpoint: protopnet_phantom2d # what was reviewed (a zoo name or a checkpoint path), for the record
    corrections:
      - prototype: 3                # index in the reviewed model
        mark: forbid                # forbid | keep
        class: malignant            # the prototype's class, for the record
        source:                     # where its source patch is: the training sample and the latent cell
          sample_id: phantom2d-train-000929
          sample_index: 929
          feature_index: [5, 4]
          image_box: [[40, 48], [32, 40]]
        note: corner marker         # optional, free text
      - prototype: 7
        mark: forbid
        where: activation           # not its source: a training patch where it activates (here: on the marker)
        source: {sample_id: phantom2d-train-000012, sample_index: 12, feature_index: [0, 7]}

A mark names a patch: by default (``where: source``) the prototype's own source patch, as a gallery shows it; with
``where: activation`` a patch of a training image where the prototype activates, as a person sees it in an
explanation (ProtoPDebug's forbidden concepts are such patches: a prototype pushed onto a lesion can still fire on a
marker). Each entry names its patch by the training sample and latent cell, not by the prototype's index alone, so
the losses re-embed the patch with the encoder as it is being fine-tuned. A prototype has at most one ``source`` mark
and any number of ``activation`` marks, one per patch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CORRECTIONS_FORMAT = 1
Mark = Literal["forbid", "keep"]
MARKS: tuple[str, ...] = ("forbid", "keep")
WHERE: tuple[str, ...] = ("source", "activation")
SOURCE_FIELDS = ("sample_id", "sample_index", "feature_index")


class CorrectionsError(ValueError):
    """A corrections file that cannot be used: names the file, the entry, the field, expected and actual values."""


@dataclass
class Correction:
    """One marked prototype.

    Attributes:
        prototype: Index of the prototype in the reviewed model.
        mark: ``"forbid"`` (patches like it must not activate any prototype) or ``"keep"``.
        source: The prototype's source patch: ``sample_id``, ``sample_index`` (index in the training split push
            read), ``feature_index`` (latent cell) and optionally ``image_box``.
        class_name: The prototype's class, for the record.
        note: Free text.
        where: ``"source"`` (the prototype's source patch) or ``"activation"`` (a patch where it activates).
    """

    prototype: int
    mark: Mark
    source: dict[str, Any]
    class_name: str | None = None
    note: str = ""
    where: str = "source"

    def patch(self) -> tuple[str, tuple[int, ...]]:
        """The patch: sample id and latent cell."""
        return str(self.source["sample_id"]), tuple(self.source["feature_index"])


@dataclass
class Corrections:
    """The corrections of one reviewed model (see the module docstring for the file)."""

    model: str
    checkpoint: str = ""
    corrections: list[Correction] = field(default_factory=list)

    def marked(self, mark: Mark) -> list[Correction]:
        """The corrections with ``mark``."""
        return [c for c in self.corrections if c.mark == mark]

    def set_mark(self, prototype: int, mark: Mark | None, source: Mapping[str, Any] | None = None,
                 class_name: str | None = None, note: str = "") -> None:
        """Mark ``prototype``'s source patch (replacing an earlier mark of it), or clear it with ``mark=None``.

        Raises:
            CorrectionsError: for an unknown mark, or a mark without the prototype's source.
        """
        self.corrections = [c for c in self.corrections if not (c.prototype == prototype and c.where == "source")]
        if mark is None:
            return
        if mark not in MARKS:
            raise CorrectionsError(f"prototype {prototype}: mark must be one of {list(MARKS)}, got {mark!r}")
        if source is None:
            raise CorrectionsError(f"prototype {prototype} has no source patch (not pushed yet); only a prototype "
                                   "with a source can be marked: push (fit with the family's recipe) first")
        self.corrections.append(Correction(prototype, mark, dict(source), class_name, note))
        self.corrections.sort(key=lambda c: (c.prototype, c.where))

    def mark_activation(self, prototype: int, mark: Mark | None, patch: Mapping[str, Any],
                        class_name: str | None = None, note: str = "") -> None:
        """Mark a training ``patch`` where ``prototype`` activates, or clear its mark with ``mark=None``.

        ``patch`` holds ``sample_id``, ``sample_index`` and ``feature_index``; a new mark of it replaces the old.

        Raises:
            CorrectionsError: for an unknown mark or a patch without its fields.
        """
        problem = _source_problem(patch)
        if problem:
            raise CorrectionsError(f"prototype {prototype}: {problem}")
        entry = Correction(prototype, mark or "forbid", dict(patch), class_name, note, "activation")
        same = (prototype, "activation", entry.patch())
        self.corrections = [c for c in self.corrections if (c.prototype, c.where, c.patch()) != same]
        if mark is None:
            return
        if mark not in MARKS:
            raise CorrectionsError(f"prototype {prototype}: mark must be one of {list(MARKS)}, got {mark!r}")
        self.corrections.append(entry)
        self.corrections.sort(key=lambda c: (c.prototype, c.where))

    def to_dict(self) -> dict[str, Any]:
        """Plain values, in the file's layout."""
        entries = []
        for correction in self.corrections:
            entry = asdict(correction)
            entry["class"] = entry.pop("class_name")
            if entry["where"] == "source":
                del entry["where"]  # the default
            entries.append({key: value for key, value in entry.items() if value not in (None, "")})
        return {"format": CORRECTIONS_FORMAT, "model": self.model, "checkpoint": self.checkpoint,
                "corrections": entries}


def write_corrections(corrections: Corrections, path: str | Path) -> Path:
    """Write ``corrections`` as YAML (replacing the file in one step) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# pellucid prototype corrections (see pellucid.models.prototype_corrections)\n"
    text += yaml.safe_dump(corrections.to_dict(), sort_keys=False)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
    return path


def _entry_problem(entry: Any, seen: set[tuple[Any, ...]]) -> str | None:
    if not isinstance(entry, Mapping):
        return f"expected a mapping with prototype, mark and source, got {entry!r}"
    prototype = entry.get("prototype")
    if isinstance(prototype, bool) or not isinstance(prototype, int) or prototype < 0:
        return f"field 'prototype': expected a prototype index >= 0, got {prototype!r}"
    if entry.get("mark") not in MARKS:
        return f"field 'mark': expected one of {list(MARKS)}, got {entry.get('mark')!r}"
    where = entry.get("where", "source")
    if where not in WHERE:
        return f"field 'where': expected one of {list(WHERE)}, got {where!r}"
    problem = _source_problem(entry.get("source"))
    if problem:
        return problem
    key = (prototype, where) if where == "source" else (prototype, where, str(entry["source"]["sample_id"]),
                                                           tuple(entry["source"]["feature_index"]))
    if key in seen:
        return (f"field 'prototype': prototype {prototype}'s {where} patch is marked twice; keep one entry per "
                "prototype and patch")
    seen.add(key)
    return None


def _source_problem(source: Any) -> str | None:
    if not isinstance(source, Mapping) or any(key not in source for key in SOURCE_FIELDS):
        return (f"field 'source': expected a mapping with {list(SOURCE_FIELDS)} (the prototype's source patch, as "
                f"`pellucid review` writes it), got {source!r}")
    index = source["sample_index"]
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        return f"field 'source.sample_index': expected an index >= 0, got {index!r}"
    cell = source["feature_index"]
    if not isinstance(cell, Sequence) or not all(isinstance(i, int) and not isinstance(i, bool) for i in cell):
        return f"field 'source.feature_index': expected a list of latent cell indices, got {cell!r}"
    return None


def read_corrections(path: str | Path, num_prototypes: int | None = None, spatial_dims: int | None = None
                     ) -> Corrections:
    """Read and check a corrections file.

    Args:
        path: The YAML (or JSON) file.
        num_prototypes: When given, every prototype index must be below it.
        spatial_dims: When given, every ``feature_index`` must have this many entries.

    Raises:
        CorrectionsError: one line naming the file, the entry, the field, expected and actual value and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise CorrectionsError(f"corrections file {str(path)!r} not found; `pellucid review` writes one")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise CorrectionsError(f"corrections file {path}: not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(content, Mapping) or not isinstance(content.get("corrections"), list):
        raise CorrectionsError(f"corrections file {path}: expected a mapping with a 'corrections' list, got "
                               f"{type(content).__name__}; see pellucid.models.prototype_corrections")
    if content.get("format", CORRECTIONS_FORMAT) != CORRECTIONS_FORMAT:
        raise CorrectionsError(f"corrections file {path}: format {content.get('format')!r}, this pellucid reads "
                               f"format {CORRECTIONS_FORMAT}")
    if not isinstance(content.get("model"), str):
        raise CorrectionsError(f"corrections file {path}: field 'model': expected the reviewed model's registry "
                               f"name, got {content.get('model')!r}")
    seen: set[tuple[Any, ...]] = set()
    corrections = []
    for number, entry in enumerate(content["corrections"]):
        problem = _entry_problem(entry, seen)
        if problem is None and num_prototypes is not None and entry["prototype"] >= num_prototypes:
            problem = (f"field 'prototype': expected an index below {num_prototypes} (the model's prototypes), got "
                       f"{entry['prototype']}")
        if problem is None and spatial_dims is not None and len(entry["source"]["feature_index"]) != spatial_dims:
            problem = (f"field 'source.feature_index': expected {spatial_dims} indices ({spatial_dims}D model), got "
                       f"{entry['source']['feature_index']}")
        if problem:
            raise CorrectionsError(f"corrections file {path}, entry {number}: {problem}")
        corrections.append(Correction(entry["prototype"], entry["mark"], dict(entry["source"]), entry.get("class"),
                                      str(entry.get("note", "")), entry.get("where", "source")))
    return Corrections(content["model"], str(content.get("checkpoint", "")), corrections)
