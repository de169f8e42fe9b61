"""`pipemon serve`'s flags and their PIPEMON_* variables: defaults, empty values, clear errors."""

import argparse

import pytest

from pipemon.model.state import parse_buckets
from pipemon.service.config import ServeConfig, add_serve_arguments, config_from_args


def parse(*argv: str) -> ServeConfig:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_an_empty_variable_or_flag_means_the_default(monkeypatch):
    monkeypatch.setenv("PIPEMON_DURATION_BUCKETS", "")
    monkeypatch.setenv("PIPEMON_MAX_PIPELINES", "")
    monkeypatch.setenv("PIPEMON_LINEAGE_PIPELINE_NAME", "")
    config = parse("--state-dir", "")
    defaults = ServeConfig()
    assert (config.duration_buckets, config.max_pipelines, config.lineage_pipeline_name, config.state_dir) == (
        defaults.duration_buckets, defaults.max_pipelines, defaults.lineage_pipeline_name, defaults.state_dir)


def test_duration_buckets_default_to_none_and_take_increasing_seconds(monkeypatch):
    monkeypatch.delenv("PIPEMON_DURATION_BUCKETS", raising=False)
    assert parse_buckets(parse().duration_buckets) == ()
    assert parse_buckets(parse("--duration-buckets", "60, 300,3600").duration_buckets) == (60, 300, 3600)
    assert parse_buckets(parse("--duration-buckets", "None").duration_buckets) == ()
    for bad in ("300,60", "0,60", "60,inf", "1m", ","):
        with pytest.raises(ValueError, match=r"^--duration-buckets / PIPEMON_DURATION_BUCKETS: expected"):
            parse("--duration-buckets", bad)
