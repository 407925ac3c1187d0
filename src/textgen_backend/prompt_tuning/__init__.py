"""TGIS prompt tuning: PEFT soft prompts chosen per request by prefix_id, from a prefix store."""
