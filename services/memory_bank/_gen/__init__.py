"""Generated from proto/hiermem/v1 by scripts/gen_proto.sh; do not edit."""
