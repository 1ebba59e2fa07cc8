"""Launcher of the demo: `python -m pydvl_datainf.demo --help`.

The demo itself lives in
[pydvl_datainf.experiments.demo][pydvl_datainf.experiments.demo].
"""

from pydvl_datainf.experiments.demo import main

if __name__ == "__main__":
    main()
