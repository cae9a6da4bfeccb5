"""Find the students' notebooks in what the instructor downloaded.

``SUBMISSIONS`` may be a folder, a ``.zip`` of one, or a single notebook.

In a folder (or the zip's contents), these are accepted and may be mixed:

=====================================================  ===================================
pattern                                                 student id
=====================================================  ===================================
``<student>/<NN_topic>/<NN_topic>.ipynb``               the folder (nbgrader's ``submitted/``)
``<student>/<NN_topic>.ipynb``                          the folder
``<Full Name>_<id>_assignsubmission_file_/<any>.ipynb`` ``<id>`` (Moodle, "in folders")
``<Full Name>_<id>_assignsubmission_file_<any>.ipynb``  ``<id>`` (Moodle, flat)
``<login>[_late]_<id>_<submission>_<any>.ipynb``        ``<id>`` (Canvas)
``<student>_<any>.ipynb``                               ``<student>`` (anything else: id first)
=====================================================  ===================================

A student id is letters, digits and ``. _ - @`` (in the last pattern, no ``_``, and it
must not look like a lecture number ``NN_``). Which lecture a notebook is: the file
name if it contains exactly one lecture name (``01_attention.ipynb``,
``01_attention (1).ipynb``, ``ann_01_attention-2.ipynb``), else the notebook's
nbgrader cells (the lecture whose graded cell ids it carries). In a student's own
folder the exact names win; a nested and a flat notebook of one lecture: the nested
one is used. Folders starting with ``.`` or ``_`` (``__MACOSX``) are ignored. Two
notebooks of one lecture for one student id (e.g. a flat LMS file and a folder)
is an error: the command cannot guess which one to grade.
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .course import UsageError

STUDENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")
MOODLE_RE = re.compile(r"^(?P<name>.+?)_(?P<id>\d+)_assignsubmission_(?:file|onlinetext)_(?P<rest>.*)$")
CANVAS_RE = re.compile(r"^(?P<login>[A-Za-z0-9.@-]+)(?:_late|_LATE)?_(?P<id>\d+)_(?P<sub>\d+)_(?P<rest>.+)$")
PLAIN_RE = re.compile(r"^(?P<id>[A-Za-z0-9][A-Za-z0-9.@-]*)_(?P<rest>.+)$")
LECTURE_LIKE = re.compile(r"^\d\d_")

LAYOUTS = ("<student>/<NN_topic>/<NN_topic>.ipynb", "<student>/<NN_topic>.ipynb")
FLAT_LAYOUTS = (
    "<Full Name>_<id>_assignsubmission_file_<NN_topic>.ipynb (Moodle)",
    "<login>_<id>_<submission>_<NN_topic>.ipynb (Canvas)",
    "<student>_<NN_topic>.ipynb",
)

#: Limits on a zip of submissions (uncompressed bytes, entries).
ZIP_MAX_BYTES = 2 * 1024**3
ZIP_MAX_FILES = 20_000


@dataclass(frozen=True)
class Submission:
    student: str
    lecture: str
    notebook: Path


def notebook_cell_ids(path: Path) -> set[str]:
    """The nbgrader grade ids in a notebook (empty when it is not a readable notebook)."""
    try:
        nb = json.loads(Path(path).read_text(encoding="utf-8"))
        return {
            c["metadata"]["nbgrader"]["grade_id"]
            for c in nb.get("cells", [])
            if isinstance(c, dict) and "grade_id" in c.get("metadata", {}).get("nbgrader", {})
        }
    except Exception:  # noqa: BLE001 - not a notebook: no ids
        return set()


def lecture_cell_ids(solutions: Path, lectures: list[str]) -> dict[str, set[str]]:
    """lecture → the graded and solution cell ids of its source notebook."""
    return {lec: notebook_cell_ids(Path(solutions) / lec / f"{lec}.ipynb") for lec in lectures}


def recognise(path: Path, text: str, lectures: list[str], cell_ids: dict[str, set[str]] | None) -> str | None:
    """Which lecture ``path`` is: by a lecture name in ``text`` (a file name), else by its cells."""
    named = [lec for lec in lectures if lec in text]
    if len(named) == 1:
        return named[0]
    if cell_ids:
        ids = notebook_cell_ids(path)
        overlap = {lec: len(ids & cell_ids.get(lec, set())) for lec in lectures}
        best = max(overlap.values(), default=0)
        winners = [lec for lec, n in overlap.items() if n == best]
        if best > 0 and len(winners) == 1:
            return winners[0]
    return None


def _flat_id(name: str) -> tuple[str, str] | None:
    """(student id, rest of the name) of an LMS download's file name, or None."""
    stem = name[: -len(".ipynb")] if name.endswith(".ipynb") else name
    for pattern in (MOODLE_RE, CANVAS_RE):
        m = pattern.match(stem)
        if m:
            return m["id"], m["rest"]
    m = PLAIN_RE.match(stem)
    if m and not LECTURE_LIKE.match(stem):
        return m["id"], m["rest"]
    return None


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def find_submissions(
    folder: Path,
    lectures: list[str],
    warnings: list[str] | None = None,
    cell_ids: dict[str, set[str]] | None = None,
    single_student: str = "self",
) -> list[Submission]:
    """Every (student, lecture) notebook in ``folder`` for ``lectures``, sorted by student then lecture.

    ``folder`` may also be one notebook (graded as student ``single_student``).
    Zips are unpacked by :func:`extract_zip` first. Raises :class:`UsageError`
    when nothing of these lectures is found, a single notebook's lecture cannot
    be told, or a student id has two notebooks of one lecture. What is skipped
    goes to ``warnings``.
    """
    folder = Path(folder)
    warnings = warnings if warnings is not None else []
    if not folder.exists():
        raise UsageError(
            f"submissions {folder} does not exist: expected a folder with one "
            "subfolder per student, a folder or .zip of LMS downloads, or one .ipynb"
        )
    if folder.is_file():
        if folder.suffix != ".ipynb":
            raise UsageError(
                f"submissions must be a folder, a .zip or one .ipynb notebook; got the file {folder}"
            )
        lecture = recognise(folder, folder.name, lectures, cell_ids)
        if lecture is None:
            raise UsageError(
                f"cannot tell which lecture {folder.name} is: expected a file name containing "
                f"{' or '.join(lectures)} or a notebook with that lecture's graded cells"
            )
        return [Submission(single_student, lecture, folder)]

    found: dict[tuple[str, str], Submission] = {}

    def add(student: str, lecture: str, path: Path) -> None:
        key = (student, lecture)
        if key in found and found[key].notebook != path:
            first, second = sorted([_rel(found[key].notebook, folder), _rel(path, folder)])
            raise UsageError(
                f"student id {student!r} appears twice for {lecture}: {first} and {second}; "
                "expected one notebook per student and lecture"
            )
        found[key] = Submission(student, lecture, path)

    seen_entries = []
    for child in sorted(folder.iterdir()):
        seen_entries.append(child.name + ("/" if child.is_dir() else ""))
        if child.name.startswith((".", "_")):
            continue
        if child.is_dir():
            moodle = MOODLE_RE.match(child.name + ("" if child.name.endswith("_") else "_"))
            if STUDENT_RE.match(child.name) and not moodle:
                student = child.name
            elif moodle:
                student = moodle["id"]
            else:
                warnings.append(f"skipped {child}: a student id is letters, digits and . _ - @")
                continue
            for lecture, path in _student_folder(child, lectures, cell_ids, warnings):
                add(student, lecture, path)
        elif child.suffix == ".ipynb":
            parsed = _flat_id(child.name)
            if parsed is None:
                warnings.append(
                    f"skipped {child.name}: no student id in the name "
                    f"(expected {'; '.join(FLAT_LAYOUTS)})"
                )
                continue
            student, rest = parsed
            lecture = recognise(child, rest, lectures, cell_ids)
            if lecture is None:
                if not any(lec in rest for lec in lectures) and cell_ids:
                    warnings.append(f"skipped {child.name}: not a notebook of {', '.join(lectures)}")
                continue
            add(student, lecture, child)
    if not found:
        shown = ", ".join(seen_entries[:5]) + (", ..." if len(seen_entries) > 5 else "")
        raise UsageError(
            f"no notebooks of {', '.join(lectures)} in {folder}: expected "
            f"{' or '.join(LAYOUTS + FLAT_LAYOUTS)}; found {shown or 'an empty folder'}"
        )
    return sorted(found.values(), key=lambda s: (s.student, lectures.index(s.lecture)))


def _student_folder(
    folder: Path, lectures: list[str], cell_ids: dict[str, set[str]] | None, warnings: list[str]
) -> list[tuple[str, Path]]:
    """(lecture, notebook) pairs in one student's folder."""
    picked: dict[str, Path] = {}
    for lecture in lectures:
        nested = folder / lecture / f"{lecture}.ipynb"
        flat = folder / f"{lecture}.ipynb"
        path = nested if nested.is_file() else flat if flat.is_file() else None
        if path is not None:
            picked[lecture] = path
    others = sorted(
        p for p in folder.glob("*.ipynb") if p.is_file() and p.name not in {f"{lec}.ipynb" for lec in lectures}
    )
    for path in others:
        lecture = recognise(path, path.name, lectures, cell_ids)
        if lecture is None:
            continue
        if lecture in picked:
            if picked[lecture].parent == folder and picked[lecture].name == f"{lecture}.ipynb" or (
                picked[lecture] == folder / lecture / f"{lecture}.ipynb"
            ):
                warnings.append(f"ignored {path}: {picked[lecture].name} is this student's {lecture}")
                continue
            first, second = sorted([picked[lecture].name, path.name])
            raise UsageError(
                f"student folder {folder.name} holds two notebooks of {lecture}: {first} and "
                f"{second}; expected one notebook per student and lecture"
            )
        picked[lecture] = path
    return sorted(picked.items())


def extract_zip(archive: Path, dest: Path, max_bytes: int = ZIP_MAX_BYTES, max_files: int = ZIP_MAX_FILES) -> Path:
    """Unpack ``archive`` into ``dest`` safely; return the folder to scan.

    Refused (UsageError, nothing written): an entry with an absolute path, a drive,
    or ``..``; a symbolic link; more than ``max_files`` entries or ``max_bytes``
    uncompressed (counted while writing too, so a lying header cannot get past).
    A zip holding one top folder and nothing else is entered.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UsageError(f"{archive} is not a readable zip file: {exc}") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > max_files:
            raise UsageError(f"{archive} has {len(infos)} entries: expected at most {max_files}")
        total = 0
        plan = []
        for info in infos:
            name = info.filename.replace("\\", "/")
            parts = PurePosixPath(name).parts
            if name.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
                raise UsageError(
                    f"{archive} has an unsafe entry {info.filename!r}: expected paths inside the archive"
                )
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise UsageError(f"{archive} has a symbolic link {info.filename!r}: expected plain files")
            total += info.file_size
            if total > max_bytes:
                raise UsageError(
                    f"{archive} unpacks to more than {max_bytes} bytes: expected a class's notebooks"
                )
            plan.append((info, parts))
        dest.mkdir(parents=True, exist_ok=True)
        written = 0
        for info, parts in plan:
            if not parts:
                continue
            target = dest.joinpath(*parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > max_bytes:
                        shutil.rmtree(dest, ignore_errors=True)
                        raise UsageError(
                            f"{archive} unpacks to more than {max_bytes} bytes: expected a class's notebooks"
                        )
                    dst.write(chunk)
    # a zip of one folder (``submissions/...``, ``submitted/...``) is entered, unless that
    # folder is itself one student's (it holds NN_topic.ipynb or NN_topic/ folders)
    entries = [p for p in dest.iterdir() if not p.name.startswith((".", "_"))]
    if len(entries) == 1 and entries[0].is_dir():
        inner = entries[0]
        own = [p for p in inner.iterdir() if LECTURE_LIKE.match(p.name)]  # NN_topic(.ipynb)
        if not own:
            return inner
    return dest
