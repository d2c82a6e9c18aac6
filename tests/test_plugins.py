"""The plugin host: registration, clashes, broken plugins, restricting what loads, listing.

Throwaway plugins are registered on the process-wide plugin manager for one test and
unregistered in ``finally``; entry points are faked in a temporary directory holding a
``*.dist-info`` (as zarr's tests do) and seen by subprocesses only.
"""

import contextlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pluggy
import pytest
from click.testing import CliRunner

import koopkit
import koopkit.plugins
from koopkit.errors import DuplicateNameError, EstimationError, PluginError
from koopkit.plugins import PluginLoadWarning
from koopkit.results import Spectrum

BUILTINS = {
    "estimator": {"dmd", "hankel-dmd", "pca-hankel"},
    "metric": {"wasserstein", "wasserstein-log", "matched-mean"},
    "test": {"permutation", "eigen-swap", "bootstrap"},
}
BUILTIN_PLUGINS = {"dmd", "spectral_metrics", "significance"}


class Registers:
    """A throwaway plugin registering ``{kind: {name: factory}}``."""

    def __init__(self, **by_kind):
        self.by_kind = by_kind

    def _register(self, kind, register):
        for name, factory in self.by_kind.get(kind, {}).items():
            register(name, factory, description=f"throwaway {kind}")

    @koopkit.hookimpl
    def koopkit_register_estimators(self, register):
        self._register("estimator", register)

    @koopkit.hookimpl
    def koopkit_register_metrics(self, register):
        self._register("metric", register)


class FitRaises:
    """An estimator whose ``fit`` fails the way third-party code does."""

    def __init__(self, error="runtime"):
        self.error = error

    def fit(self, trajectories):
        if self.error == "koopkit":
            raise EstimationError("Expected a contractive system. Got a diverging one instead.")
        raise RuntimeError("kaboom inside fit")


class Constant:
    def __init__(self, value=0.5):
        self.value = value

    def fit(self, trajectories):
        return Spectrum([self.value])


@contextlib.contextmanager
def throwaway(**plugins):
    """Register plugins by name for the duration of the block; registries are rebuilt."""
    pm = koopkit.plugins.get_plugin_manager()
    registered = []
    try:
        for name, plugin in plugins.items():
            pm.register(plugin, name=name)
            registered.append(name)
        koopkit.plugins.registry.cache_clear()
        yield pm
    finally:
        for name in registered:
            pm.unregister(name=name)
        koopkit.plugins.registry.cache_clear()


@pytest.fixture
def plugins():
    """``plugins(name=obj, ...)`` registers throwaway plugins until the test ends."""
    with contextlib.ExitStack() as stack:
        yield lambda **named: stack.enter_context(throwaway(**named))


@pytest.fixture
def fresh_host():
    """Plugins loaded anew from entry points before and after the test."""
    koopkit.plugins.refresh()
    try:
        yield
    finally:
        koopkit.plugins.refresh()


# ------------------------------------------------------------- throwaway plugins


def test_throwaway_plugin_is_registered_then_gone():
    before = set(koopkit.plugins.registry("estimator"))
    assert before >= BUILTINS["estimator"]
    with throwaway(constant_plugin=Registers(estimator={"constant": Constant})):
        entry = koopkit.plugins.lookup("estimator", "constant")
        assert (entry.plugin, entry.package, entry.version) == ("constant_plugin", None, None)
        assert entry.info == {"description": "throwaway estimator"}
        spectrum = koopkit.estimate(np.zeros((3, 2)), estimator="constant", value=0.25)
        assert spectrum.eigenvalues.tolist() == [0.25]
        assert set(koopkit.plugins.registry("estimator")) == before | {"constant"}
    assert set(koopkit.plugins.registry("estimator")) == before


def _clash(message, kind, name, *plugins):
    """The clash message names the name and both plugins, in either order."""
    a, b = plugins
    expected = [
        f"{kind} {name!r} is registered by both plugin {x!r} and plugin {y!r}."
        for x, y in ((a, b), (b, a))
    ]
    assert message in expected, message


def test_duplicate_names_name_both_plugins_when_used(plugins):
    plugins(impostor=Registers(estimator={"dmd": Constant, "constant": Constant}))
    names = set(koopkit.plugins.registry("estimator"))
    with pytest.warns(PluginLoadWarning) as warned:
        koopkit.plugins.list_plugins()
    (message,) = [str(w.message) for w in warned]
    _clash(message, "Estimator", "dmd", "dmd", "impostor")
    assert {"hankel-dmd", "constant"} <= names  # the other names of both plugins stay
    with pytest.raises(DuplicateNameError) as info:
        koopkit.plugins.lookup("estimator", "dmd")
    assert str(info.value) == message and isinstance(info.value, PluginError)
    assert koopkit.plugins.lookup("estimator", "constant").plugin == "impostor"


def test_duplicate_names_between_two_third_party_plugins(plugins):
    plugins(first=Registers(metric={"same": Constant}), second=Registers(metric={"same": Constant}))
    with pytest.raises(DuplicateNameError) as info:
        koopkit.plugins.lookup("metric", "same")
    _clash(str(info.value), "Metric", "same", "first", "second")
    assert "dmd" in koopkit.plugins.registry("estimator")  # other kinds are unaffected


def test_a_duplicate_name_fails_in_one_line_where_it_is_used(plugins, tmp_path):
    plugins(impostor=Registers(metric={"wasserstein": Constant}))
    with pytest.warns(PluginLoadWarning, match="'wasserstein' is registered by both"):
        listing = CliRunner().invoke(_cli(), ["plugins"])
    assert listing.exit_code == 0 and "matched-mean" in listing.stdout
    result = CliRunner().invoke(_cli(), ["compare", str(tmp_path / "none.zarr"), "--by", "x"])
    assert result.exit_code == 1
    line = result.stderr.splitlines()[-1]
    assert line.startswith("Error: ")
    _clash(line[7:], "Metric", "wasserstein", "spectral_metrics", "impostor")


class ClashesThenRaises:
    @koopkit.hookimpl
    def koopkit_register_metrics(self, register):
        register("wasserstein", Constant)
        raise RuntimeError("kaboom after the clash")


def test_a_plugin_skipped_after_a_clash_leaves_the_name_to_the_other(plugins):
    plugins(late=ClashesThenRaises())
    with pytest.warns(PluginLoadWarning, match="'late' failed to register metrics"):
        koopkit.plugins.registry("metric")
    assert koopkit.plugins.lookup("metric", "wasserstein").plugin == "spectral_metrics"


@pytest.mark.parametrize("name", ["has space", "a\nb", "--json", "-x", "none", "é"])
def test_names_the_cli_could_not_show_or_select_are_refused(plugins, name):
    plugins(odd=Registers(metric={name: Constant}))
    with pytest.warns(PluginLoadWarning, match="'odd' failed to register metrics.*invalid metric"):
        assert name not in koopkit.plugins.registry("metric")


def test_registry_keeps_registration_order(plugins):
    plugins(late=Registers(estimator={"constant": Constant}))
    names = list(koopkit.plugins.registry("estimator"))
    assert names[:3] == ["dmd", "hankel-dmd", "pca-hankel"] and names[-1] == "constant"


class RaisesWhileRegistering:
    @koopkit.hookimpl
    def koopkit_register_estimators(self, register):
        register("half-registered", Constant)
        raise RuntimeError("kaboom while registering")


def test_plugin_raising_at_registration_is_warned_and_skipped(plugins):
    before = {kind: set(koopkit.plugins.registry(kind)) for kind in ("estimator", "metric")}
    plugins(
        exploding=RaisesWhileRegistering(),
        fine=Registers(estimator={"constant": Constant}),
    )
    with pytest.warns(PluginLoadWarning) as warned:
        names = set(koopkit.plugins.registry("estimator"))
    assert [str(w.message) for w in warned] == [
        "Plugin 'exploding' failed to register estimators and was skipped: "
        "RuntimeError: kaboom while registering"
    ]
    assert names == before["estimator"] | {"constant"}  # nothing of it, all of the others
    assert set(koopkit.plugins.registry("metric")) == before["metric"]


class InvalidName:
    @koopkit.hookimpl
    def koopkit_register_metrics(self, register):
        register("", Constant)


def test_invalid_name_is_warned_and_skipped(plugins):
    before = set(koopkit.plugins.registry("metric"))
    plugins(nameless=InvalidName())
    with pytest.warns(
        PluginLoadWarning, match="'nameless' failed to register metrics.*invalid metric name ''"
    ):
        assert set(koopkit.plugins.registry("metric")) == before


def _cli():
    from koopkit.cli import cli

    return cli


@pytest.fixture
def store(tmp_path):
    from koopkit.store.importers import import_npy

    npy = tmp_path / "x.npy"
    rng = np.random.default_rng(0)
    np.save(npy, rng.standard_normal((12, 3)))
    url = tmp_path / "runs.zarr"
    import_npy(npy, url, "run-0", tags={"seed": 0})
    return str(url)


def test_plugin_raising_inside_fit_is_one_cli_line(plugins, store):
    plugins(failing=Registers(estimator={"failing": FitRaises}))
    args = ["spectrum", store, "--estimator", "failing", "--no-save"]
    result = CliRunner().invoke(_cli(), args)
    # stderr: a progress line per group, then the error in one line
    assert result.exit_code == 1
    assert result.stdout == "" and "Traceback" not in result.stderr
    error = result.stderr.splitlines()[-1]
    assert error.startswith("Error: ") and "kaboom inside fit" in error
    assert [line for line in result.stderr.splitlines() if line.startswith("Error")] == [error]

    result = CliRunner().invoke(_cli(), [*args, "--param", "error=koopkit", "--json"])
    assert result.exit_code == 1
    assert re.fullmatch(  # the plugin's own error, naming the runs it concerns
        r"Error: Runs \['[^']+'\]: Expected a contractive system\. Got a diverging one instead\.\n",
        result.stderr,
    )

    result = CliRunner().invoke(_cli(), ["--debug", *args])
    # --debug lets the traceback through, with the plugin's own exception as the cause
    assert isinstance(result.exception.__cause__, RuntimeError)


def test_plugin_raising_inside_fit_is_named(plugins, store):
    plugins(failing=Registers(estimator={"failing": FitRaises}))
    result = CliRunner().invoke(_cli(), ["spectrum", store, "--estimator", "failing", "--no-save"])
    assert result.exit_code == 1
    assert "'failing'" in result.stderr.splitlines()[-1]


class Misspelt:
    @koopkit.hookimpl
    def koopkit_register_estimator(self, register):  # no trailing "s"
        register("never", Constant)


def test_misspelt_hook_is_an_error():
    pm = koopkit.plugins.get_plugin_manager()
    pm.register(Misspelt(), name="misspelt")
    try:
        with pytest.raises(
            pluggy.PluginValidationError, match="unknown hook 'koopkit_register_estimator'"
        ):
            pm.check_pending()
    finally:
        pm.unregister(name="misspelt")
    pm.check_pending()


def test_hookimpl_with_an_argument_the_spec_lacks_is_refused():
    class ExtraArgument:
        @koopkit.hookimpl
        def koopkit_register_metrics(self, register, extra):
            pass

    pm = koopkit.plugins.get_plugin_manager()
    try:
        with pytest.raises(pluggy.PluginValidationError, match="extra"):
            pm.register(ExtraArgument(), name="extra-argument")
    finally:  # pluggy keeps the name registered after refusing the hook
        if pm.get_plugin("extra-argument") is not None:
            pm.unregister(name="extra-argument")


# ------------------------------------------------------ entry points, in-process


def test_entry_point_failing_to_import_is_warned(monkeypatch, fresh_host):
    real = importlib.metadata.entry_points
    broken = importlib.metadata.EntryPoint(
        name="broken", value="koopkit_no_such_module_for_tests", group="koopkit"
    )

    def entry_points(**selection):
        found = real(**selection)
        if selection.get("group") == "koopkit":
            return importlib.metadata.EntryPoints([*found, broken])
        return found

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    koopkit.plugins.refresh()
    with pytest.warns(PluginLoadWarning) as warned:
        names = {e["name"] for e in koopkit.plugins.list_plugins()}
    assert [str(w.message) for w in warned] == [
        "Plugin 'broken' (koopkit_no_such_module_for_tests) failed to load and was skipped: "
        "ModuleNotFoundError: No module named 'koopkit_no_such_module_for_tests'"
    ]
    assert names >= set().union(*BUILTINS.values())


# ------------------------------------------------------ entry points, subprocesses

FAKE_PLUGINS = {
    "koopkit_fake_broken.py": 'raise RuntimeError("boom at import")\n',
    "koopkit_fake_good.py": """\
        import click
        import koopkit
        from koopkit.results import Spectrum

        class Half:
            def fit(self, trajectories):
                return Spectrum([0.5])

        @koopkit.hookimpl
        def koopkit_register_estimators(register):
            register("half", Half, description="always 0.5")

        @koopkit.hookimpl
        def koopkit_register_commands(cli):
            @cli.command(name="hello")
            def hello():
                \"\"\"Say hello from a plugin.\"\"\"
                click.echo("hello from a plugin")
        """,
    "koopkit_fake_misspelt.py": """\
        import koopkit

        @koopkit.hookimpl
        def koopkit_register_estimator(register):
            register("never", object)
        """,
    "koopkit_fake_commands_raise.py": """\
        import koopkit

        @koopkit.hookimpl
        def koopkit_register_commands(cli):
            raise RuntimeError("no commands today")
        """,
    "koopkit_fake_commands_replace.py": """\
        import click
        import koopkit

        @koopkit.hookimpl
        def koopkit_register_commands(cli):
            @cli.command(name="plugins")
            def plugins():
                click.echo("not koopkit's plugins")
        """,
    "koopkit_fake_subcommand_replace.py": """\
        import click
        import koopkit

        @koopkit.hookimpl
        def koopkit_register_commands(cli):
            @cli.commands["import"].command(name="npy")
            def npy():
                click.echo("not koopkit's import npy")
        """,
}


def fake_site(tmp_path, **entry_points):
    """A directory with plugin modules and a dist-info declaring ``name=module`` entry points."""
    for filename, source in FAKE_PLUGINS.items():
        (tmp_path / filename).write_text(textwrap.dedent(source))
    info = tmp_path / "koopkit_fake_plugins-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: koopkit-fake-plugins\nVersion: 0.3\n"
    )
    lines = "".join(f"{name} = {module}\n" for name, module in entry_points.items())
    (info / "entry_points.txt").write_text(f"[koopkit]\n{lines}")
    return tmp_path


def koopkit_cli(*args, site=None, **variables):
    """``koopkit ARGS`` in a subprocess, with only the given KOOPKIT_* variables set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOOPKIT_")}
    env.update(variables)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-c", "from koopkit.cli import main; main()", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def test_broken_entry_point_is_warned_and_the_cli_still_works(tmp_path):
    site = fake_site(tmp_path, broken="koopkit_fake_broken", good="koopkit_fake_good")
    done = koopkit_cli("plugins", "--json", site=site)
    assert done.returncode == 0, done.stderr
    warning = (
        "Warning: Plugin 'broken' (koopkit_fake_broken) failed to load and was "
        "skipped: RuntimeError: boom at import"
    )
    assert warning in done.stderr
    assert "Traceback" not in done.stderr
    entries = {e["name"]: e for e in json.loads(done.stdout)}
    assert set(entries) >= set().union(*BUILTINS.values()) | {"half"}
    assert "never" not in entries
    assert entries["half"] == {
        "name": "half",
        "kind": "estimator",
        "plugin": "good",
        "package": "koopkit-fake-plugins",
        "version": "0.3",
        "description": "always 0.5",
    }
    hello = koopkit_cli("hello", site=site)
    assert (hello.returncode, hello.stdout) == (0, "hello from a plugin\n")


def test_a_plugin_breaking_or_replacing_commands_is_skipped_and_the_cli_works(tmp_path):
    site = fake_site(
        tmp_path,
        raising="koopkit_fake_commands_raise",
        replacing="koopkit_fake_commands_replace",
        nested="koopkit_fake_subcommand_replace",
        good="koopkit_fake_good",
    )
    done = koopkit_cli("--help", site=site)
    assert done.returncode == 0, done.stderr
    assert "hello" in done.stdout and "Traceback" not in done.stderr
    assert (
        "Plugin 'raising' failed to add commands and was skipped: RuntimeError: no commands today"
        in done.stderr
    )
    assert "Plugin 'replacing' failed to add commands and was skipped: PluginError: " in done.stderr
    assert "Plugin 'nested' failed to add commands" in done.stderr and "'import npy'" in done.stderr
    npy = koopkit_cli("import", "npy", "--help", site=site)
    assert npy.returncode == 0 and "not koopkit" not in npy.stdout
    listing = koopkit_cli("plugins", "--json", site=site)
    assert listing.returncode == 0 and {"half", "dmd"} <= {
        e["name"] for e in json.loads(listing.stdout)
    }


def test_an_entry_point_named_like_a_builtin_one_does_not_replace_it(tmp_path):
    site = fake_site(tmp_path, significance="koopkit_fake_good")
    done = koopkit_cli("plugins", "--json", site=site)
    assert done.returncode == 0, done.stderr
    assert (
        "Plugin 'significance' of package 'koopkit-fake-plugins' has the name of plugin "
        "'significance' of package 'koopkit', loaded already, and was skipped"
    ) in done.stderr
    names = {e["name"] for e in json.loads(done.stdout)}
    assert names >= BUILTINS["test"] and "half" not in names


def test_misspelt_hook_in_an_entry_point_is_reported_in_one_line(tmp_path):
    site = fake_site(tmp_path, misspelt="koopkit_fake_misspelt")
    done = koopkit_cli("plugins", site=site)
    assert "Traceback" not in done.stderr
    assert "'misspelt'" in done.stderr and "koopkit_register_estimator" in done.stderr


RESTRICTIONS = {
    "none": ({"KOOPKIT_LOAD_PLUGINS": ""}, set()),
    "only-metrics": ({"KOOPKIT_LOAD_PLUGINS": "spectral_metrics"}, {"spectral_metrics"}),
    "two-with-spaces": ({"KOOPKIT_LOAD_PLUGINS": " dmd , significance "}, {"dmd", "significance"}),
    "disable-one": ({"KOOPKIT_DISABLE_PLUGINS": "significance"}, {"dmd", "spectral_metrics"}),
    "load-then-disable": (
        {"KOOPKIT_LOAD_PLUGINS": "dmd,significance", "KOOPKIT_DISABLE_PLUGINS": "significance"},
        {"dmd"},
    ),
}
KIND_OF_PLUGIN = {"dmd": "estimator", "spectral_metrics": "metric", "significance": "test"}


def assert_loaded(entries, plugins):
    """Exactly the given built-in plugins contributed entries, each all of its names."""
    builtin = [e for e in entries if e["package"] == "koopkit"]
    assert {e["plugin"] for e in builtin} == plugins
    for plugin in plugins:
        names = {e["name"] for e in builtin if e["plugin"] == plugin}
        assert names == BUILTINS[KIND_OF_PLUGIN[plugin]]


@pytest.mark.parametrize("case", RESTRICTIONS)
def test_environment_restricts_loading(case, monkeypatch, fresh_host):
    variables, expected = RESTRICTIONS[case]
    monkeypatch.delenv("KOOPKIT_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("KOOPKIT_DISABLE_PLUGINS", raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    koopkit.plugins.refresh()
    assert_loaded(koopkit.plugins.list_plugins(), expected)


def test_environment_restricts_the_cli():
    done = koopkit_cli("plugins", "--json", KOOPKIT_LOAD_PLUGINS="")
    assert (done.returncode, json.loads(done.stdout)) == (0, []), done.stderr
    done = koopkit_cli("plugins", "--json", KOOPKIT_DISABLE_PLUGINS="significance")
    assert done.returncode == 0, done.stderr
    assert_loaded(json.loads(done.stdout), {"dmd", "spectral_metrics"})


def test_environment_blocks_a_third_party_entry_point(tmp_path):
    site = fake_site(tmp_path, broken="koopkit_fake_broken", good="koopkit_fake_good")
    done = koopkit_cli("plugins", "--json", site=site, KOOPKIT_DISABLE_PLUGINS="broken,good")
    assert done.returncode == 0 and done.stderr == ""
    plugins = {e["plugin"] for e in json.loads(done.stdout)}
    assert plugins >= BUILTIN_PLUGINS and not plugins & {"broken", "good"}


def test_output_into_a_closed_pipe_is_quiet():
    read, write = os.pipe()
    os.close(read)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOOPKIT_")}
    command = [sys.executable, "-c", "from koopkit.cli import main; main()", "plugins"]
    try:
        done = subprocess.run(
            command, stdout=write, stderr=subprocess.PIPE, text=True, env=env, timeout=120
        )
    finally:
        os.close(write)
    assert done.stderr == ""


# ------------------------------------------------------------------ listing


def test_plugins_json_lists_every_builtin_name():
    result = CliRunner().invoke(_cli(), ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    entries = json.loads(result.stdout)
    builtin = [e for e in entries if e["package"] == "koopkit"]
    for kind, names in BUILTINS.items():
        assert {e["name"] for e in builtin if e["kind"] == kind} == names
    for entry in builtin:
        assert entry["plugin"] in BUILTIN_PLUGINS
        assert entry["version"] == koopkit.__version__
        assert entry["description"]
    assert len({(e["kind"], e["name"]) for e in entries}) == len(entries)


def test_plugins_text_has_one_line_per_name():
    result = CliRunner().invoke(_cli(), ["plugins"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == len(koopkit.plugins.list_plugins())
    dmd = next(line for line in lines if line.split()[1] == "dmd")
    assert dmd.split()[:4] == ["estimator", "dmd", "koopkit", koopkit.__version__]


HEAVY = ("torch", "dask", "zarr", "xarray", "matplotlib", "ot", "sklearn", "pandas")

LIGHTNESS_PROBE = """\
import sys

def heavy():
    return sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1:]))

import koopkit
koopkit.hookimpl
print("import koopkit:", *heavy())
import koopkit.testing
print("import koopkit.testing:", *heavy())
import koopkit.plugins
assert koopkit.plugins.list_plugins()
print("list_plugins():", *heavy())
from click.testing import CliRunner
from koopkit.cli import cli
assert CliRunner().invoke(cli, ["plugins", "--json"]).exit_code == 0
print("koopkit plugins --json:", *heavy())
"""


def test_import_and_listing_stay_light():
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOOPKIT_")}
    done = subprocess.run(
        [sys.executable, "-c", LIGHTNESS_PROBE, *HEAVY],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    stages = dict(line.split(":", 1) for line in done.stdout.splitlines())
    stages = {stage: set(modules.split()) for stage, modules in stages.items()}
    assert stages["import koopkit"] == set()
    assert stages["import koopkit.testing"] == set()
    # Listing may import numpy/scipy (built-in plugin modules), never torch or dask.
    assert not stages["list_plugins()"] & {"torch", "dask"}, stages
    assert not stages["koopkit plugins --json"] & {"torch", "dask"}, stages
