"""Helpers the test modules share: configs of test runs, data folders, the real-data location.

No module here is named test_*, so pytest collects none of them; test modules import them as
`from tests.helpers import ...` and never import each other.
"""
