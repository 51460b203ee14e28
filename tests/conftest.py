import os
import sys
from pathlib import Path

# Keep torch from oversubscribing the 2-core CI machine when several learners share a process.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
