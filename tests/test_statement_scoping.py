"""Layer 2 of tenancy, checked statically: every repository statement is built by a base helper.

``repositories/base.py`` holds the only statement builders: ``_select`` /
``_live`` (``WHERE tenant_id = :tenant``), ``_update`` (the same), ``_insert``
(stamps the tenant), ``_tenant_row`` / ``_update_tenant_row`` (the tenant's own
row in the global ``tenants`` table), ``_select_columns`` and ``_update_oldest``
(a work queue's UPDATE of the oldest matching rows). This test reads
the other repository modules with :mod:`ast` and reports, by file and line,
every way a statement could read or write a table without one of them:

1. calling or importing a statement builder of SQLAlchemy (``update``,
   ``insert``, ``delete``, ``text``, ``literal_column``, ``table``, ``exists``, …),
   whether by name or as an attribute of an imported ``sqlalchemy`` module;
2. ``select(...)`` over anything but scoped expressions. It is allowed only as a
   wrapper that reads no table of its own: every argument must be *scoped*
   (a scalar subquery of a helper-built statement, a column of a helper-built
   CTE, a ``select`` of those, optionally ``.label``-ed), and nothing chained
   on the wrapper may name a model;
3. reaching for the session or connection (``.execute(``, ``.exec_driver_sql(``,
   ``.stream(``, ``session``, ``_run``, ``_conn``, …): statements run only
   through the base executors ``_rows`` / ``_all`` / ``_one_or_none`` / ``_scalar``;
4. passing the base executors a statement that is not scoped;
5. pulling another table into a helper-built statement: a model other than
   the statement's own named in ``.where``/``.with_only_columns``/``.values``/
   ``.returning``/… (an implicit, unscoped FROM), or any unscoped
   ``.join``/``.outerjoin``/``.select_from``.

"Scoped" is computed by a small taint analysis: a helper call is scoped; a
method call or attribute on a scoped expression is scoped (SQLAlchemy's
generative API); a local variable is scoped if every assignment to it is; a
private method or a nested function is scoped if every value it returns is.

The checker is run on the real sources and on small in-memory sources that
break each rule, to show it can fail.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from textwrap import dedent

import pytest

import slack_fathom_db.repositories

REPO_DIR = Path(slack_fathom_db.repositories.__file__).parent
HELPERS = frozenset(
    {
        "_select",
        "_live",
        "_update",
        "_insert",
        "_tenant_row",
        "_update_tenant_row",
        "_select_columns",
        "_update_oldest",
    }
)
EXECUTORS = frozenset({"_rows", "_one_or_none", "_all", "_scalar"})
# Executors of compiled statements, and the position of their builder argument: a
# reference to a method of the repository that returns a helper-built statement.
COMPILED_EXECUTORS = {"_fetch": 1, "_fetch_records": 2, "_fetch_record": 2}
# Statement builders and raw-SQL constructs of SQLAlchemy; ``select`` is handled by rule 2.
FORBIDDEN_BUILDERS = frozenset(
    {
        "update",
        "insert",
        "delete",
        "text",
        "literal_column",
        "table",
        "column",
        "exists",
        "union",
        "union_all",
        "intersect",
        "except_",
        "values",
        "lateral",
        "join",
        "outerjoin",
        "Select",
        "Insert",
        "Update",
        "Delete",
        "TextClause",
    }
)
SESSION_CALLS = frozenset(
    {"execute", "exec_driver_sql", "stream", "stream_scalars", "run_sync", "connection"}
)
SESSION_ATTRIBUTES = frozenset(
    {
        "session",
        "_session",
        "sync_session",
        "_conn",
        "_connection",
        "_engine",
        "engine",
        "_uow",
        "_run",
        "fetch",
        "fetch_statement",
        "driver",
        "get_raw_connection",
        "driver_connection",
        "bind",
    }
)
FROM_METHODS = frozenset({"join", "outerjoin", "select_from", "join_from", "add_cte"})
NO_TABLE = ""  # the "model" of a select() wrapper: it has no table of its own


@dataclass(frozen=True, slots=True)
class Violation:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass
class _Info:
    scoped: bool
    model: str | None  # the model the statement is on; None when unknown


@dataclass
class _Scope:
    """Local names of one function: variables and nested functions."""

    variables: dict[str, _Info] = field(default_factory=dict)
    functions: dict[str, _Info] = field(default_factory=dict)
    parent: _Scope | None = None

    def variable(self, name: str) -> _Info | None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.variables:
                return scope.variables[name]
            scope = scope.parent
        return None

    def function(self, name: str) -> _Info | None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.functions:
                return scope.functions[name]
            scope = scope.parent
        return None


def _combine(infos: list[_Info]) -> _Info:
    """Several values of one name: scoped if all are; the model if the known ones agree."""
    models = {i.model for i in infos if i.model is not None}
    return _Info(
        scoped=all(i.scoped for i in infos), model=models.pop() if len(models) == 1 else None
    )


def _own_nodes(fn: ast.AST) -> list[ast.AST]:
    """The nodes of a function body, without those of nested functions or classes."""
    found: list[ast.AST] = []
    stack = list(ast.iter_child_nodes(fn))
    while stack:
        node = stack.pop()
        found.append(node)
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            stack.extend(ast.iter_child_nodes(node))
    return found


class _Checker:
    def __init__(self, source: str, path: str) -> None:
        self.tree = ast.parse(source)
        self.path = path
        self.violations: list[Violation] = []
        self.select_names: set[str] = set()
        self.sqlalchemy_modules: set[str] = set()
        self.models: set[str] = set()
        self.scoped_statements = 0  # statements proven scoped at executor calls
        self.class_model: str | None = None  # `model = X` of the class being read
        self.methods: dict[str, _Info] = {}  # its private methods that return scoped statements

    # -- reporting -------------------------------------------------------------------

    def flag(self, node: ast.AST, message: str) -> None:
        line = getattr(node, "lineno", 0)
        violation = Violation(self.path, line, message)
        if violation not in self.violations:
            self.violations.append(violation)

    # -- entry point -----------------------------------------------------------------

    def run(self) -> list[Violation]:
        self._imports()
        self._forbidden_calls()
        module_scope = _Scope()
        for node in self.tree.body:
            if isinstance(node, ast.ClassDef):
                self._class(node)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                self._function(node, module_scope)
        return sorted(self.violations, key=lambda v: (v.line, v.message))

    # -- rule 1: imports and direct builders -------------------------------------------

    def _imports(self) -> None:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "sqlalchemy" or node.module.startswith("sqlalchemy."):
                    for alias in node.names:
                        local = alias.asname or alias.name
                        if alias.name == "select":
                            self.select_names.add(local)
                        elif alias.name in FORBIDDEN_BUILDERS:
                            self.flag(
                                node,
                                f"imports the statement builder {alias.name!r} from "
                                f"{node.module}; build statements with the base helpers",
                            )
                        elif alias.name in {"sql", "expression", "sqlalchemy"}:
                            self.sqlalchemy_modules.add(local)
                elif node.module == "slack_fathom_db.models" or node.module.startswith(
                    "slack_fathom_db.models."
                ):
                    self.models.update(
                        alias.asname or alias.name
                        for alias in node.names
                        if alias.name[:1].isupper() and not alias.name.isupper()
                    )
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "sqlalchemy" or alias.name.startswith("sqlalchemy."):
                        self.sqlalchemy_modules.add((alias.asname or alias.name).split(".")[0])

    def _forbidden_calls(self) -> None:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Name) and func.id in FORBIDDEN_BUILDERS:
                    self.flag(node, f"calls {func.id}(...) directly; use the base helpers")
                elif isinstance(func, ast.Attribute):
                    if self._is_sqlalchemy_module(func.value) and func.attr in FORBIDDEN_BUILDERS:
                        self.flag(node, f"calls sqlalchemy {func.attr}(...) directly")
                    if func.attr in SESSION_CALLS:
                        self.flag(
                            node,
                            f"calls .{func.attr}(...) directly; statements run through "
                            "self._rows / _all / _one_or_none / _scalar",
                        )
            if isinstance(node, ast.Attribute) and node.attr in SESSION_ATTRIBUTES:
                self.flag(
                    node,
                    f"reaches for .{node.attr}: a repository gets no session or connection "
                    "of its own, only the base executors",
                )

    def _is_sqlalchemy_module(self, node: ast.expr) -> bool:
        while isinstance(node, ast.Attribute):
            node = node.value
        return isinstance(node, ast.Name) and node.id in self.sqlalchemy_modules

    def _is_select(self, func: ast.expr) -> bool:
        if isinstance(func, ast.Name):
            return func.id == "select" or func.id in self.select_names
        return (
            isinstance(func, ast.Attribute)
            and func.attr == "select"
            and self._is_sqlalchemy_module(func.value)
        )

    # -- classes and functions ---------------------------------------------------------

    def _class(self, cls: ast.ClassDef) -> None:
        self.class_model = None
        for stmt in cls.body:
            if (
                isinstance(stmt, ast.Assign)
                and len(stmt.targets) == 1
                and isinstance(stmt.targets[0], ast.Name)
                and stmt.targets[0].id == "model"
                and isinstance(stmt.value, ast.Name)
            ):
                self.class_model = stmt.value.id
        functions = [s for s in cls.body if isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef)]
        # Private methods that return helper-built statements count as helpers (fixpoint).
        self.methods = {}
        changed = True
        while changed:
            changed = False
            for fn in functions:
                if fn.name in self.methods or not fn.name.startswith("_") or fn.name in HELPERS:
                    continue
                returns = self._returns(fn, _Scope())
                if returns is not None and returns.scoped:
                    self.methods[fn.name] = returns
                    changed = True
        for fn in functions:
            self._function(fn, _Scope())
        self.class_model, self.methods = None, {}

    def _returns(self, fn: ast.FunctionDef | ast.AsyncFunctionDef, parent: _Scope) -> _Info | None:
        """Whether every return value of ``fn`` is scoped, and the model they share."""
        scope = self._scope_of(fn, parent)
        values = [
            n.value for n in _own_nodes(fn) if isinstance(n, ast.Return) and n.value is not None
        ]
        if not values:
            return None
        return _combine([self._info(v, scope) for v in values])

    def _scope_of(self, fn: ast.FunctionDef | ast.AsyncFunctionDef, parent: _Scope) -> _Scope:
        scope = _Scope(parent=parent)
        nodes = _own_nodes(fn)
        for nested in nodes:
            if isinstance(nested, ast.FunctionDef | ast.AsyncFunctionDef):
                info = self._returns(nested, scope)
                if info is not None:
                    scope.functions[nested.name] = info
        assignments: dict[str, list[ast.expr]] = {}
        assigned: set[int] = set()
        for node in nodes:
            if isinstance(node, ast.Assign | ast.AnnAssign | ast.NamedExpr) and node.value:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Name):
                        assignments.setdefault(target.id, []).append(node.value)
                        assigned.add(id(target))
        for node in nodes:  # loop variables, `with … as`, `x += …`: not statements we know
            if (
                isinstance(node, ast.Name)
                and isinstance(node.ctx, ast.Store)
                and id(node) not in assigned
            ):
                assignments.setdefault(node.id, []).append(ast.Constant(None))
        for arg in [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]:
            scope.variables[arg.arg] = _Info(scoped=False, model=None)
        # Greatest fixpoint: assume scoped, drop what is assigned anything unscoped.
        for name in assignments:
            scope.variables[name] = _Info(scoped=True, model=None)
        for _ in range(100):
            changed = False
            for name, values in assignments.items():
                info = _combine([self._info(v, scope) for v in values])
                if info != scope.variables[name]:
                    scope.variables[name] = info
                    changed = True
            if not changed:
                break
        return scope

    def _function(self, fn: ast.FunctionDef | ast.AsyncFunctionDef, parent: _Scope) -> None:
        scope = self._scope_of(fn, parent)
        for node in _own_nodes(fn):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                self._function(node, scope)
            elif isinstance(node, ast.Call):
                self._call(node, scope)

    # -- scoping ---------------------------------------------------------------------

    def _info(self, node: ast.expr, scope: _Scope) -> _Info:
        """Whether ``node`` is a helper-built (scoped) expression, and its model."""
        if isinstance(node, ast.Await):
            return self._info(node.value, scope)
        if isinstance(node, ast.Name):
            return scope.variable(node.id) or _Info(scoped=False, model=None)
        if isinstance(node, ast.Attribute | ast.Subscript):
            return self._info(node.value, scope)
        if not isinstance(node, ast.Call):
            return _Info(scoped=False, model=None)
        func = node.func
        if isinstance(func, ast.Attribute):
            if isinstance(func.value, ast.Name) and func.value.id == "self":
                if func.attr in HELPERS:
                    return _Info(scoped=True, model=self._helper_model(node))
                if func.attr in self.methods:
                    return self.methods[func.attr]
                return _Info(scoped=False, model=None)
            return self._info(func.value, scope)
        if isinstance(func, ast.Name):
            local = scope.function(func.id)
            if local is not None:
                return local
            if self._is_select(func):
                scoped = bool(node.args) and not node.keywords
                scoped = scoped and all(self._info(arg, scope).scoped for arg in node.args)
                return _Info(scoped=scoped, model=NO_TABLE)
        if self._is_select(func):
            return _Info(scoped=False, model=NO_TABLE)
        return _Info(scoped=False, model=None)

    def _helper_model(self, call: ast.Call) -> str | None:
        name = call.func.attr if isinstance(call.func, ast.Attribute) else ""
        if name in {"_tenant_row", "_update_tenant_row"}:
            return "Tenant"
        if name in {"_select_columns", "_update_oldest"} or not call.args:
            return self.class_model
        first = call.args[0]
        if isinstance(first, ast.Name) and first.id in self.models:
            return first.id
        return None

    # -- rules 2, 4 and 5 -------------------------------------------------------------

    def _call(self, node: ast.Call, scope: _Scope) -> None:
        func = node.func
        if self._is_select(func):
            info = self._info(node, scope)
            if not info.scoped:
                self.flag(
                    node,
                    "select(...) of something not built by a base helper: a select() may only "
                    "wrap scalar subqueries / CTE columns of helper-built statements",
                )
        if not isinstance(func, ast.Attribute):
            return
        if isinstance(func.value, ast.Name) and func.value.id == "self":
            if func.attr in EXECUTORS:
                statement = node.args[0] if node.args else None
                if statement is None or not self._info(statement, scope).scoped:
                    self.flag(
                        node,
                        f"self.{func.attr}(...) runs a statement that is not built by a base "
                        "helper",
                    )
                else:
                    self.scoped_statements += 1
            if func.attr in COMPILED_EXECUTORS:
                index = COMPILED_EXECUTORS[func.attr]
                builder = node.args[index] if len(node.args) > index else None
                if (
                    isinstance(builder, ast.Attribute)
                    and isinstance(builder.value, ast.Name)
                    and builder.value.id == "self"
                    and (builder.attr in self.methods or builder.attr in HELPERS)
                ):
                    self.scoped_statements += 1
                else:
                    self.flag(
                        node,
                        f"self.{func.attr}(...) compiles a statement whose builder is not a "
                        "method returning a helper-built statement",
                    )
            if func.attr == "_select_columns":
                self._foreign_models(node, self.class_model, scope, func.attr)
            return
        base = self._info(func.value, scope)
        if not base.scoped:
            return
        if func.attr in FROM_METHODS:
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                if not self._info(arg, scope).scoped:
                    self.flag(
                        node,
                        f".{func.attr}(...) brings in a table that is not built by a base helper",
                    )
        if base.model is not None:
            self._foreign_models(node, base.model, scope, func.attr)

    def _foreign_models(
        self,
        node: ast.Call,
        own: str | None,
        scope: _Scope,
        method: str,
    ) -> None:
        """Flag another model named in the arguments of a call on a statement of ``own``."""
        stack: list[ast.AST] = [*node.args, *(k.value for k in node.keywords)]
        while stack:
            current = stack.pop()
            if (
                isinstance(current, ast.expr)
                and not isinstance(current, ast.Name)
                and self._info(current, scope).scoped
            ):
                continue  # a helper-built subquery: checked on its own
            if isinstance(current, ast.Name) and current.id in self.models and current.id != own:
                where = f"a statement on {own}" if own else "a select() wrapper"
                self.flag(
                    current,
                    f"names {current.id} in .{method}(...) of {where}: another table in the "
                    "FROM, not scoped by a base helper",
                )
            stack.extend(ast.iter_child_nodes(current))


def check_source(source: str, path: str = "<memory>") -> list[Violation]:
    """The violations of the scoping rule in one repository module."""
    return _Checker(dedent(source), path).run()


def _repository_files() -> list[Path]:
    return sorted(p for p in REPO_DIR.glob("*.py") if p.name not in {"base.py", "__init__.py"})


# -- the real sources -----------------------------------------------------------------


def test_the_repository_modules_are_all_checked() -> None:
    names = {p.name for p in _repository_files()}
    assert {"audit.py", "meetings.py", "rate_limits.py", "tenants.py"} <= names


@pytest.mark.parametrize("path", _repository_files(), ids=lambda p: p.name)
def test_repository_statements_are_built_by_base_helpers(path: Path) -> None:
    checker = _Checker(
        path.read_text(encoding="utf-8"), f"slack_fathom_db/repositories/{path.name}"
    )
    violations = checker.run()
    assert not violations, "\n".join(str(v) for v in violations)
    # Not vacuous: the module runs statements, and each was proven helper-built.
    assert checker.scoped_statements > 0


# -- the checker can fail ---------------------------------------------------------------

REPO_PREAMBLE = """
from sqlalchemy import func, select
from slack_fathom_db.models import CrmConnection, User
from slack_fathom_db.repositories.base import TenantRepository

class Repo(TenantRepository[User]):
    model = User
"""


def _repo(body: str) -> str:
    return REPO_PREAMBLE + "\n" + "\n".join("    " + line for line in dedent(body).splitlines())


BAD_SOURCES = {
    "select_of_a_model": _repo(
        """
        async def get(self, user_id):
            return await self._one_or_none(select(User).where(User.id == user_id), action="x")
        """
    ),
    "select_of_a_column_outside_an_executor": _repo(
        """
        def statement(self):
            return select(User.id)
        """
    ),
    "select_mixing_scoped_and_unscoped": _repo(
        """
        async def count(self):
            statement = select(
                self._live().with_only_columns(func.count()).scalar_subquery(), User.id
            )
            return await self._rows(statement, action="x")
        """
    ),
    "where_on_a_select_wrapper": _repo(
        """
        async def count(self):
            scoped = self._live().with_only_columns(func.count()).scalar_subquery()
            return await self._rows(select(scoped).where(User.id == 1), action="x")
        """
    ),
    "imported_update": "from sqlalchemy import update\n",
    "imported_postgresql_insert": "from sqlalchemy.dialects.postgresql import insert\n",
    "imported_text": "from sqlalchemy.sql import text as sql_text\n",
    "module_attribute_select": """
        import sqlalchemy as sa
        from slack_fathom_db.models import User

        def statement():
            return sa.select(User)
        """,
    "module_attribute_delete": """
        import sqlalchemy
        from slack_fathom_db.models import User

        def statement():
            return sqlalchemy.delete(User)
        """,
    "session_execute_text": _repo(
        """
        async def raw(self, session):
            return await session.execute(text("SELECT * FROM users"))
        """
    ),
    "session_from_the_unit_of_work": _repo(
        """
        async def raw(self):
            session = self._run
            return await session.scalars(self._live())
        """
    ),
    "executor_with_a_foreign_statement": _repo(
        """
        async def run(self, statement):
            return await self._all(statement, action="x")
        """
    ),
    "join_to_an_unscoped_table": _repo(
        """
        async def with_connections(self):
            statement = self._live().join(CrmConnection)
            return await self._all(statement, action="x")
        """
    ),
    "where_on_another_model": _repo(
        """
        async def implicit_cross_join(self, cid):
            statement = self._live().where(CrmConnection.id == cid)
            return await self._all(statement, action="x")
        """
    ),
    "columns_of_another_model": _repo(
        """
        async def columns(self):
            return await self._all(self._select_columns(CrmConnection.id), action="x")
        """
    ),
    "update_values_from_another_model": _repo(
        """
        async def touch(self):
            statement = self._update(User).values(display_name=CrmConnection.provider_type)
            return await self._rows(statement, action="x")
        """
    ),
    "variable_reassigned_to_an_unscoped_statement": _repo(
        """
        async def get(self, flag):
            statement = self._live()
            if flag:
                statement = select(User)
            return await self._all(statement, action="x")
        """
    ),
}


@pytest.mark.parametrize("source", list(BAD_SOURCES.values()), ids=list(BAD_SOURCES))
def test_checker_flags_statements_that_bypass_the_helpers(source: str) -> None:
    assert check_source(source), "the checker missed a statement built outside the helpers"


def test_checker_flags_a_direct_select_of_user_with_its_line() -> None:
    source = dedent(
        """\
        from sqlalchemy import select
        from slack_fathom_db.models import User


        class Repo:
            model = User

            async def get(self, user_id):
                return await self._one_or_none(select(User), action="get user")
        """
    )
    violations = check_source(source, "repositories/evil.py")
    assert [(v.path, v.line) for v in violations] == [
        ("repositories/evil.py", 9),
        ("repositories/evil.py", 9),
    ]
    messages = " | ".join(v.message for v in violations)
    assert "select(...) of something not built by a base helper" in messages
    assert "self._one_or_none(...) runs a statement that is not built by a base helper" in messages


GOOD_SOURCE = _repo(
    """
    def _window_row(self, name):
        return self._select().where(User.slack_user_id == name)

    async def stats(self):
        def count(model, *conditions):
            return (
                self._live(model).with_only_columns(func.count()).where(*conditions).scalar_subquery()
            )

        statement = select(count(User).label("users"), count(CrmConnection).label("crm"))
        return (await self._rows(statement, action="stats")).one()

    async def charge(self, name):
        insert = self._insert(User, slack_user_id=name)
        charged = insert.on_conflict_do_nothing().returning(User.id).cte("charged")
        prior = self._window_row(name).with_only_columns(User.id)
        statement = select(
            select(charged.c.id).scalar_subquery().label("granted"),
            prior.scalar_subquery().label("prior"),
        )
        return (await self._rows(statement, action="charge")).one()

    async def find(self, cid, verified):
        connection = self._live(CrmConnection).with_only_columns(CrmConnection.id)
        connection = connection.where(CrmConnection.id == cid)
        match = self._live().with_only_columns(User.id).where(
            User.id == connection.scalar_subquery()
        )
        if verified:
            match = match.where(User.role == "owner")
        statement = self._update().where(User.id == match.scalar_subquery()).returning(User)
        return await self._one_or_none(statement, action="find")
    """
)


def test_checker_accepts_scoped_wrappers_and_helper_chains() -> None:
    checker = _Checker(dedent(GOOD_SOURCE), "<memory>")
    assert checker.run() == []
    assert checker.scoped_statements == 3


def test_a_compiled_statement_needs_a_helper_built_builder() -> None:
    source = _repo(
        """
        def _unscoped(self):
            return select(User)

        async def bad(self):
            return await self._fetch("x", self._unscoped, action="x")

        def _scoped(self):
            return self._select().where(User.id == 1)

        async def good(self):
            return await self._fetch("y", self._scoped, action="y")
        """
    )
    checker = _Checker(source, "example.py")
    messages = [violation.message for violation in checker.run()]
    assert any("compiles a statement whose builder" in message for message in messages)
    assert checker.scoped_statements == 1
