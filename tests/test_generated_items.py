"""Generated items are pytest.Function items: fixtures from plugins (syrupy's ``snapshot``,
pytest-benchmark's ``benchmark``) and from a user's conftest reach them."""

from __future__ import annotations

import textwrap


def test_generated_item_uses_snapshot_benchmark_and_conftest_fixtures(pytester):
    pytester.makeconftest(textwrap.dedent("""
        import pytest
        from pytest_kdcontracts.check import Check
        from pytest_kdcontracts.collect import make_item

        @pytest.fixture
        def user_value():
            return 41

        def run(snapshot, benchmark, user_value):
            result = benchmark(lambda: user_value + 1)
            assert result == snapshot

        class Demo(pytest.File):
            def collect(self):
                yield make_item(self, Check("uses_fixtures", ("demo",), run, ("snapshot", "benchmark", "user_value")), ("tokens",))

        def pytest_collect_file(file_path, parent):
            if file_path.name == "demo.contract":
                return Demo.from_parent(parent, path=file_path)
    """))
    pytester.makefile(".contract", demo="")
    first = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--snapshot-update", "--benchmark-disable")
    first.assert_outcomes(passed=1)
    first.stdout.fnmatch_lines(["*1 snapshot generated*"])
    again = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-m", "kdcontract and tokens", "--benchmark-disable", "-v")
    again.assert_outcomes(passed=1)
    again.stdout.fnmatch_lines(["*::uses_fixtures[[]demo[]] PASSED*", "*1 snapshot passed*"])
