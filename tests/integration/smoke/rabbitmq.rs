//! The real RabbitMQ: publisher confirms on a declared queue, then get the message back.

use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

use crate::support::{amqp_url, unique_name};

#[tokio::test]
async fn a_confirmed_message_comes_back_from_its_queue() {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ (is `make env-up` done?)");
    let channel = conn.create_channel().await.unwrap();
    let queue = unique_name("smoke");
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();

    let confirm = channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            b"stock changed",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "broker confirmed the message");

    let got = channel
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("one message in the queue");
    assert_eq!(got.delivery.data, b"stock changed");
    conn.close(200, "done".into()).await.unwrap();
}
