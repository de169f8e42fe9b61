"""DAGs for tests/integrations/test_airflow.py, each run once by the scheduler (`@once`): one that succeeds (row
counts through the operator's own OpenLineage method), one that fails, one retried to success, one whose task is
SIGKILLed, one with mapped tasks; and one the test runs with `airflow dags test`."""

import os
import signal
from datetime import datetime, timedelta

from airflow.providers.openlineage.extractors import OperatorLineage
from airflow.sdk import BaseOperator, dag, task
from openlineage.client.event_v2 import OutputDataset
from openlineage.client.facet_v2 import output_statistics_output_dataset

START = datetime(2024, 1, 1)
OWNER = {"owner": "team:data-eng"}  # arrives as the DAG's and the tasks' ownership facet


class LoadRows(BaseOperator):
    """Writes `rows` rows and says so in its OpenLineage output statistics, as a real loader would."""

    def __init__(self, rows: int, **kwargs):
        super().__init__(**kwargs)
        self.rows = rows

    def execute(self, context):
        return self.rows

    def get_openlineage_facets_on_complete(self, task_instance):
        stats = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(rowCount=self.rows)
        return OperatorLineage(outputs=[OutputDataset(namespace="file", name=f"/warehouse/{self.task_id}",
                                                      outputFacets={"outputStatistics": stats})])


@dag(schedule="@once", start_date=START, catchup=False, default_args=OWNER)
def af_success():
    LoadRows(task_id="load_orders", rows=1000) >> LoadRows(task_id="load_items", rows=234)


@dag(schedule="@once", start_date=START, catchup=False, default_args=OWNER)
def af_fail():
    @task
    def broken():
        raise RuntimeError("this task fails, on purpose")

    @task
    def downstream():
        return 1

    broken() >> downstream()


@dag(schedule="@once", start_date=START, catchup=False,
     default_args={**OWNER, "retries": 1, "retry_delay": timedelta(seconds=1)})
def af_retry():
    @task
    def flaky(ti=None):
        if ti.try_number < 2:
            raise RuntimeError("first try fails, on purpose; the retry succeeds")
        return "ok"

    flaky()


@dag(schedule="@once", start_date=START, catchup=False, default_args=OWNER)
def af_killed():
    @task
    def oom():
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would: no terminal event from the task

    oom()


@dag(schedule="@once", start_date=START, catchup=False, default_args=OWNER)
def af_mapped():
    @task
    def square(x):
        return x * x

    square.expand(x=[1, 2, 3])


@dag(schedule=None, start_date=START, catchup=False, default_args=OWNER)
def af_dags_test():
    """Never scheduled: the test runs it with `airflow dags test`, which sends no DAG-level START."""
    LoadRows(task_id="load", rows=5)


af_success()
af_fail()
af_retry()
af_killed()
af_mapped()
af_dags_test()
