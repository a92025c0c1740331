"""LaMP data in two layouts.

* Per-user (Per-Pcs / MTA, ../shared/data/lamp): a JSON list of
  ``{"user_id", "profile": [...], "query": [{"id", "input", "gold"}]}``.
* Official LaMP: ``*_questions.json`` with ``[{"id", "input", "profile"}]`` and, beside it,
  ``*_outputs.json`` with ``{"task", "golds": [{"id", "output"}]}``; each question is its own user.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mta.io import MTAError, read_json
from mta.tasks import Task


@dataclass
class Query:
    id: str
    input: str
    gold: str | None = None


@dataclass
class User:
    user_id: str
    profile: list[dict]
    queries: list[Query] = field(default_factory=list)


# One rule for every place a user id names something: a user folder (`mta personalize`), a store row and
# a URL path (`mta serve`). Never a path: no slash, no leading dot.
USER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$"


def check_user_id(user_id: str, hint: str = "") -> str:
    if not isinstance(user_id, str) or not re.fullmatch(USER_ID_PATTERN, user_id):
        raise MTAError(f"invalid user id {user_id!r}: use 1-128 letters, digits, '_', '.', '@' or '-', "
                       f"not starting with a symbol{hint}")
    return user_id


def _require(obj: object, keys: tuple[str, ...], where: str) -> dict:
    if not isinstance(obj, dict):
        raise MTAError(f"{where}: expected an object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise MTAError(f"{where}: missing field(s) {missing}")
    return obj


def _profile(raw: object, where: str, task: Task | None) -> list[dict]:
    if not isinstance(raw, list):
        raise MTAError(f"{where}: 'profile' must be a list of items")
    if task is not None:
        for j, item in enumerate(raw):
            task.check_item(item, f"{where}, profile item {j}")
    return raw


def _outputs_path(questions: Path) -> Path | None:
    if "questions" not in questions.name:
        return None
    p = questions.with_name(questions.name.replace("questions", "outputs"))
    return p if p.exists() else None


def load_users(path: str | Path, task: Task | None = None) -> list[User]:
    """Load either layout; with `task`, every profile item is checked for that task's fields."""
    path = Path(path)
    data = read_json(path, "data file")
    if not isinstance(data, list):
        raise MTAError(f"data file {path}: expected a JSON list of users or questions, got {type(data).__name__}")
    if not data:
        raise MTAError(f"data file {path} holds no users")
    if isinstance(data[0], dict) and "user_id" in data[0]:
        users = _per_user(data, path, task)
    else:
        users = _official(data, path, task)
    seen: set[str] = set()
    for u in users:
        if u.user_id in seen:
            raise MTAError(f"data file {path}: user id {u.user_id!r} appears twice")
        seen.add(u.user_id)
    return users


def _per_user(data: list, path: Path, task: Task | None) -> list[User]:
    users = []
    for i, raw in enumerate(data):
        where = f"{path}: user #{i}"
        _require(raw, ("user_id", "profile"), where)
        where = f"{path}: user {raw['user_id']!r}"
        if not isinstance(raw.get("query", []), list):
            raise MTAError(f"{where}: 'query' must be a list of {{'id', 'input'}}")
        queries = []
        for j, q in enumerate(raw.get("query", [])):
            _require(q, ("id", "input"), f"{where}, query #{j}")
            queries.append(Query(str(q["id"]), str(q["input"]), None if q.get("gold") is None else str(q["gold"])))
        users.append(User(str(raw["user_id"]), _profile(raw["profile"], where, task), queries))
    return users


def _official(data: list, path: Path, task: Task | None) -> list[User]:
    golds: dict[str, str] = {}
    outputs = _outputs_path(path)
    if outputs is not None:
        golds = _outputs_by_id(_require(read_json(outputs, "outputs file"), ("golds",), str(outputs))["golds"],
                               str(outputs), "gold")
    users = []
    for i, raw in enumerate(data):
        _require(raw, ("id", "input", "profile"), f"{path}: question #{i}")
        qid = str(raw["id"])
        where = f"{path}: question {qid!r}"
        users.append(User(qid, _profile(raw["profile"], where, task), [Query(qid, str(raw["input"]), golds.get(qid))]))
    return users


def find_user(users: list[User], user_id: str) -> User:
    for u in users:
        if u.user_id == str(user_id):
            return u
    sample = ", ".join(u.user_id for u in users[:5])
    raise MTAError(f"unknown user {user_id!r}: not among the {len(users)} users of the data file (e.g. {sample})")


def lamp_task_name(task_id: str) -> str:
    """LaMP's own files spell a task `LaMP_4`; its evaluator refuses prediction files spelled otherwise."""
    return task_id.replace("-", "_")


def predictions_file(task_id: str, golds: list[dict]) -> dict:
    """Predictions in LaMP's format, ready for its official evaluator: {"task": "LaMP_4", "golds": [{"id", "output"}]}."""
    return {"task": lamp_task_name(task_id), "golds": golds}


def read_predictions(path: str | Path, task_id: str) -> dict[str, str]:
    """{query id: output} of a LaMP predictions file for `task_id` (either spelling of the task)."""
    preds = _require(read_json(path, "predictions file"), ("task", "golds"), f"predictions file {path}")
    if lamp_task_name(str(preds["task"])) != lamp_task_name(task_id):
        raise MTAError(f"predictions file {path} holds predictions for {preds['task']!r}, not {task_id}")
    by_id = _outputs_by_id(preds["golds"], f"predictions file {path}", "prediction")
    if not by_id:
        raise MTAError(f"predictions file {path} holds no predictions")
    return by_id


def pair_with_golds(predictions: dict[str, str], golds: dict[str, str], where: str, partial: bool = False) -> tuple[list[str], list[str]]:
    """(predictions, golds) by query id for scoring. Every prediction needs a gold; every gold needs a prediction too
    unless `partial`: a file that answers some queries must not score as if it were complete."""
    if not golds:
        raise MTAError(f"{where} holds no gold answers to score against")
    extra = sorted(set(predictions) - set(golds))
    if extra:
        raise MTAError(f"{len(extra)} prediction id(s) have no gold in {where}, e.g. {extra[:3]}")
    missing = sorted(set(golds) - set(predictions))
    if missing and not partial:
        raise MTAError(f"the predictions answer {len(predictions)} of the {len(golds)} queries with a gold in {where}: "
                       f"{len(missing)} are missing, e.g. {missing[:3]}; pass --partial to score only the answered ones")
    ids = sorted(predictions)
    return [predictions[i] for i in ids], [golds[i] for i in ids]


def _outputs_by_id(golds: object, where: str, what: str) -> dict[str, str]:
    """{id: output} of LaMP's `golds` list: its gold files and prediction files share that shape."""
    if not isinstance(golds, list):
        raise MTAError(f"{where}: 'golds' must be a list of {{'id', 'output'}}")
    out: dict[str, str] = {}
    for i, g in enumerate(golds):
        _require(g, ("id", "output"), f"{where}: {what} #{i}")
        if str(g["id"]) in out:
            raise MTAError(f"{where}: id {g['id']!r} appears twice")
        if not isinstance(g["output"], str):  # never scored as the string "None"
            raise MTAError(f"{where}: {what} #{i} (id {g['id']!r}): 'output' must be a string, got {g['output']!r:.40}")
        out[str(g["id"])] = g["output"]
    return out


def require_profile(user: User) -> list[dict]:
    if not user.profile:
        raise MTAError(f"user {user.user_id!r} has an empty profile: there is no history to personalize from")
    return user.profile
