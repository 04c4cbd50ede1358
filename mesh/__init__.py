"""ScheduleZero Mesh."""
