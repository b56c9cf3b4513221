//! SNS and SQS on moto: a queue subscribed to a topic receives what the topic publishes.

use std::time::Duration;

use aws_sdk_sqs::types::QueueAttributeName;

use crate::support::unique_name;

#[tokio::test]
async fn a_subscribed_queue_receives_a_topic_message() {
    let config = crate::support::aws_sdk_config().await;
    let sns = aws_sdk_sns::Client::new(&config);
    let sqs = aws_sdk_sqs::Client::new(&config);

    let topic_arn = sns
        .create_topic()
        .name(unique_name("smoke"))
        .send()
        .await
        .expect("create topic (is `make env-up` done?)")
        .topic_arn
        .expect("topic arn");
    let queue_url = sqs
        .create_queue()
        .queue_name(unique_name("smoke"))
        .send()
        .await
        .expect("create queue")
        .queue_url
        .expect("queue url");
    let queue_arn = sqs
        .get_queue_attributes()
        .queue_url(&queue_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .expect("queue attributes")
        .attributes
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .expect("queue arn");
    sns.subscribe()
        .topic_arn(&topic_arn)
        .protocol("sqs")
        .endpoint(&queue_arn)
        .attributes("RawMessageDelivery", "true")
        .send()
        .await
        .expect("subscribe");

    sns.publish()
        .topic_arn(&topic_arn)
        .message("stock changed")
        .send()
        .await
        .expect("publish");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let body = loop {
        let out = sqs
            .receive_message()
            .queue_url(&queue_url)
            .wait_time_seconds(1)
            .send()
            .await
            .expect("receive");
        if let Some(message) = out.messages.unwrap_or_default().into_iter().next() {
            break message.body.unwrap_or_default();
        }
        assert!(tokio::time::Instant::now() < deadline, "no message within 20 s");
    };
    assert_eq!(body, "stock changed");
}
