"""AWS Lambda entry point (`handler.lambda_function.handler`).

lifespan="off": Mangum would run the lifespan cycle on every invocation; the model is loaded once
per container when handler.main is imported. The strict adapters turn an event whose body claims
base64 but is not into a 400 instead of an unhandled binascii.Error (handler/lambda_adapter.py).
"""

from mangum import Mangum

from handler.lambda_adapter import STRICT_HANDLERS
from handler.main import app

handler = Mangum(app, lifespan="off", custom_handlers=STRICT_HANDLERS)
