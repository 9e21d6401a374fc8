"""What coordinator and workers share: value types (`types`), typed messages and the wire
format, store file transfer, CURVE links, tier placement, Ray glue, the node-resource
command and the `ray up` configs (`*.yaml`). Imports nothing from models, worker or
coordinator."""
