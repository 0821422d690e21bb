"""The integration tests' fixtures and helpers (a throwaway PostgreSQL, Tidepool processes), shared:
every public name of tests/integration/conftest.py is this module's too, so that modules that
import from `conftest` find them whichever of the two was imported under that name."""

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
_spec = importlib.util.spec_from_file_location("integration_conftest", HERE.parent / "integration" / "conftest.py")
_integration = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_integration)
globals().update({name: value for name, value in vars(_integration).items() if not name.startswith("_")})
