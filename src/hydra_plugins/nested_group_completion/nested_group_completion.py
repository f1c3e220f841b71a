"""Tab completion of options inside nested config groups, e.g. ``experiment=cifar10/mixer-s-dense``.

Hydra completes ``group=`` only with the configs that sit directly in ``configs/<group>/``; every experiment lives
one folder deeper, so ``python run.py experiment=<TAB>`` offered nothing. Hydra imports every module under
``hydra_plugins`` when it looks for plugins (also for ``-sc query=bash``, which the installed bash completion calls),
so this module extends the completion query there: options in subfolders are offered as ``sub/name``.
"""
from __future__ import annotations

from hydra.core.object_type import ObjectType
from hydra.plugins.completion_plugin import CompletionPlugin

_hydra_query_config_groups = CompletionPlugin._query_config_groups


def nested_options(plugin: CompletionPlugin, group: str, config_name: str | None, overrides: list[str]) -> list[str]:
    """Every option of ``group`` and of its subfolders, the latter as ``sub/name`` (what ``group=`` accepts)."""
    loader = plugin.config_loader
    options = list(loader.get_group_options(group, ObjectType.CONFIG, config_name, overrides))
    for sub in loader.get_group_options(group, ObjectType.GROUP, config_name, overrides):
        options += [f"{sub}/{name}" for name in nested_options(plugin, f"{group}/{sub}", config_name, overrides)]
    return options


def _query_config_groups(self: CompletionPlugin, word: str, config_name: str | None,
                         words: list[str]) -> tuple[list[str], bool]:
    matches, exact = _hydra_query_config_groups(self, word, config_name, words)
    prefix = word[0] if word[:1] in ("+", "~") else ""
    group, eq, _ = word[len(prefix):].rpartition("=")
    if not eq or not group:
        return matches, exact
    nested = [f"{prefix}{group}={option}" for option in nested_options(self, group, config_name, words)]
    found = [name for name in nested if name.startswith(word)]
    return sorted(set(matches) | set(found)), exact or bool(found)


CompletionPlugin._query_config_groups = _query_config_groups
