from tests.e2e.conftest import make_appliance  # noqa: F401 - shared fixture
