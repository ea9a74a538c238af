"""Third-party attributors, losses and models, found through one entry-point group.

A package adds its own by declaring, in its packaging metadata::

    [options.entry_points]
    manip_bench.plugins =
        my_methods = my_package.manip_plugin

Loading the entry point imports ``my_package.manip_plugin``, whose decorators
(``manip_bench.attributors.register``, ``manip_bench.losses.register``,
``manip_bench.models.register``) add its classes and models. Plugins are loaded once, the
first time a registry is asked for its names; a plugin that fails to load is reported by
a warning naming it, and the rest of manip-bench keeps working.
"""
import importlib.metadata
import warnings

GROUP = "manip_bench.plugins"
_LOADED = []


def load():
    """Import every installed plugin once (later calls do nothing)."""
    if _LOADED:
        return
    _LOADED.append(True)
    for entry_point in importlib.metadata.entry_points(group=GROUP):
        try:
            entry_point.load()
        except Exception as error:  # noqa: BLE001 - a broken plugin must not break the tool
            warnings.warn(f"manip-bench plugin {entry_point.name!r} ({entry_point.value}) "
                          f"failed to load: {error}", RuntimeWarning, stacklevel=2)
