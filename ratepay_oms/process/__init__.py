"""Process definitions: YAML files → immutable, validated definitions (no database, no RatePAY)."""
