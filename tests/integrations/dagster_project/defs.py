"""A Dagster job for tests/integrations/test_dagster.py, and the OpenLineage sensor that reports it.

`flaky` fails on its first attempt and succeeds on the retry its RetryPolicy allows; `maybe_broken` fails when the
run's config says so. One run with `fail: true` fails, one without succeeds."""

from dagster import Config, Definitions, In, Nothing, OpExecutionContext, RetryPolicy, in_process_executor, job, op
from dagster_openlineage import openlineage_sensor


class BrokenConfig(Config):
    fail: bool = False


@op
def extract() -> int:
    return 3


@op(retry_policy=RetryPolicy(max_retries=1))
def flaky(context: OpExecutionContext, rows: int) -> int:
    if context.retry_number == 0:
        raise RuntimeError("first attempt fails, on purpose; the retry succeeds")
    return rows


@op(ins={"after": In(Nothing)})
def maybe_broken(config: BrokenConfig) -> None:
    if config.fail:
        raise RuntimeError("this step fails, on purpose")


@job(executor_def=in_process_executor)  # one process: the test stays lean
def shop_assets_job():
    maybe_broken(after=flaky(extract()))


defs = Definitions(jobs=[shop_assets_job], sensors=[openlineage_sensor(minimum_interval_seconds=1,
                                                                       record_filter_limit=200)])
