"""Money and time as the launcher prints them."""


def money(cents):
    return f"${cents / 100:,.2f}"


def duration(hours):
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.2f} h"
