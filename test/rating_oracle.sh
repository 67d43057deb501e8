#!/bin/sh
# metering.rate against CloudKitty's HashMap module (see rating_oracle.py).
exec /usr/bin/python3 "$(dirname "$0")/rating_oracle.py"
