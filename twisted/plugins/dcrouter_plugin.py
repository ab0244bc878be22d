# The twistd plugin: `twistd dcrouter --config FILE`. Nothing heavy is imported here; the work is in
# dcrouter.tap. There is deliberately no __init__.py in twisted/ or twisted/plugins/.
from twisted.application.service import ServiceMaker

DcRouter = ServiceMaker(
    "dcrouter",
    "dcrouter.tap",
    "SMTP store-and-forward gateway and TCP/SNI/HTTP router.",
    "dcrouter",
)
