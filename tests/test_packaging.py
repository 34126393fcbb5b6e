"""The installed library must not need the repo checkout: every package and shipped file is declared."""

import configparser

from conftest import REPO


def test_every_subpackage_is_declared_in_setup_cfg():
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    declared = {line.strip() for line in parser["options"]["packages"].splitlines() if line.strip()}
    on_disk = {
        ".".join(path.parent.relative_to(REPO).parts)
        for path in (REPO / "hf_robust").rglob("__init__.py")
        if "__pycache__" not in path.parts
    }
    assert on_disk - declared == set(), "add these packages to setup.cfg [options] packages"
    assert {"hf_robust.resources.metrics", "hf_robust.resources.model_cards"} <= declared


def test_metrics_and_templates_resolve_to_package_files():
    from hf_robust.resources import metric_path, model_card_template

    assert (REPO / "metrics" / "worst_group_accuracy").samefile(metric_path("worst_group_accuracy")) or \
        metric_path("worst_group_accuracy").endswith("hf_robust/resources/metrics/worst_group_accuracy")
    assert model_card_template().endswith("robust_model_card.md")
    for module in (REPO / "metrics").iterdir():
        if module.is_dir() and not module.name.startswith("__"):
            assert (module / f"{module.name}.py").is_file() and (module / "README.md").is_file(), module
