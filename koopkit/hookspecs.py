"""The plugin contract: every hook receives a callback and registers things through it."""

import pluggy

hookspec = pluggy.HookspecMarker("koopkit")
hookimpl = pluggy.HookimplMarker("koopkit")


@hookspec
def koopkit_register_estimators(register):
    """Register Koopman estimators: ``register(name, factory, **info)``; ``factory(**params).fit(trajectories)``."""


@hookspec
def koopkit_register_metrics(register):
    """Register spectral distances: ``register(name, factory, **info)``; ``factory(**params)(a, b) -> float``."""


@hookspec
def koopkit_register_tests(register):
    """Register significance tests: ``register(name, factory, **info)``; ``factory(**params).run(groups, metric)``."""


@hookspec
def koopkit_register_commands(cli):
    """Add click commands to the ``koopkit`` command group."""
