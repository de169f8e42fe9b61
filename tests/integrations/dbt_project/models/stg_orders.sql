select * from (values (1, 10.0), (2, 20.0), (3, 30.0)) as t(order_id, amount)
