"""Child process of :class:`service_harness.ServerProcess`: run the service with given settings.

    python service_process.py '<settings JSON>' <seconds of delay per ingested sample>

The delay (0 for none) slows ingest down so a test can stop the server while a job runs.
"""

import json
import sys
import time

from services.server import run
from services.settings import Settings

if __name__ == "__main__":
    settings = Settings(**json.loads(sys.argv[1]))
    delay = float(sys.argv[2])
    if delay > 0:
        import shards.ingest

        read = shards.ingest._EntityReader.read

        def slow_read(self, *args, **kwargs):
            time.sleep(delay)
            return read(self, *args, **kwargs)

        shards.ingest._EntityReader.read = slow_read
    run(settings)
