import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import specstream_mlx  # noqa: E402,F401  (OpenBLAS before mlx)
