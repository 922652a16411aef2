"""AWS Lambda entry point (`handler.lambda_function.handler`).

lifespan="off": Mangum would run the lifespan cycle on every invocation; the model is loaded once
per container when handler.main is imported. The strict adapters turn an event whose body claims
base64 but is not into a 400 instead of an unhandled binascii.Error (handler/lambda_adapter.py).
With SnapStart, the hooks in handler/snapstart.py renew per-environment state after a restore.
"""

# handler.main first: importing it starts the model load, which the other imports then overlap.
from handler.main import app, settings  # isort: skip

from mangum import Mangum

from handler.lambda_adapter import STRICT_HANDLERS
from handler.snapstart import register_hooks

handler = Mangum(app, lifespan="off", custom_handlers=STRICT_HANDLERS)
register_hooks(app, settings, handler)  # SnapStart's before-snapshot and after-restore hooks
