select order_id, amount * 2 as amount from {{ ref('stg_orders') }}
